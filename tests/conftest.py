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


def round_weights(run_dir: Path, rnd: int) -> dict:
    """The global weights a run checkpointed after round ``rnd`` (SHA-256 checked)."""
    from server.checkpoints import load_checkpoint

    return load_checkpoint(Path(run_dir) / "checkpoints" / f"round_{rnd:03d}.pt")[0]


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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
