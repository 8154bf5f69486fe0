"""Shared fixtures: one tiny synthetic cohort per test session, preprocessed once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small and fast everywhere in tests; the same overrides reach server and clients.
TEST_OVERRIDES = [
    "model=small",
    "train.epochs=4",
    "train.n_boot=50",
    "train.min_patients=3",
    "federation.num_rounds=2",
    "federation.local_epochs=1",
    "federation.histogram_bins=20",
]


@pytest.fixture(scope="session")
def test_cfg():
    from common.config import load_config

    return load_config(TEST_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, test_cfg) -> Path:
    """Seven sites (six train + external) of ~8-12 patients, with every site's cache built."""
    from common.cohort import discover_sites, ensure_caches
    from common.config import to_plain
    from common.synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, seed=3, scale=0.06, cfg=to_plain(test_cfg.synth), progress=False)
    ensure_caches(discover_sites(out), test_cfg, progress=False)
    return out


@pytest.fixture()
def flwr_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def pytest_configure(config):
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
