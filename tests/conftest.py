"""Shared fixtures: one tiny synthetic cohort per test session, preprocessed once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small and fast everywhere in tests; the same overrides reach server and clients (only keys a site's
# default policy lets a run change: floors and site settings come from each site's policy.toml below).
TEST_OVERRIDES = [
    "model=small",
    "train.epochs=4",
    "train.n_boot=50",
    "federation.num_rounds=2",
    "federation.local_epochs=1",
    "federation.histogram_bins=20",
]
# offline work on the whole cohort (baselines, packages built in tests): its own floor
LOCAL_OVERRIDES = TEST_OVERRIDES + ["train.min_patients=3"]

# every tiny test site's own policy: floors low enough for 8-12 patients, cells merged below 2, one torch
# thread per client (the site's own setting; runs are bit-reproducible with it), and 40 % of a training
# site's patients validating (the exact split gives 3-4 of 8-10 patients, enough for the floors)
TINY_SITE_POLICY = """# test site: floors for a tiny cohort (the site's decision, not the run's); runs may set a short bootstrap
allowed_run_keys_extra = ["seed", "train.n_boot"]
min_patients = { benefit = 3, dfs = 3 }
min_cell_count = 2

[config]
train.num_threads = 1
data.val_fraction = 0.4
"""


def project_bundle() -> tuple[Path, str]:
    """The project's app bundle (what `newadj bundle` writes and `newadj run` submits), built once per process."""
    import tempfile

    from server.ops.processes import app_dir, write_bundle

    key = str(app_dir())
    if key not in _BUNDLES:
        _BUNDLES[key] = write_bundle(Path(tempfile.mkdtemp(prefix="newadj-test-bundle-")) / "newadj.fab")
    return _BUNDLES[key]


_BUNDLES: dict[str, tuple[Path, str]] = {}


def write_site_policy(site: Path, text: str = TINY_SITE_POLICY) -> None:
    """The site's policy.toml: ``text``, and the project's app bundle approved as the site's IT would after
    reviewing it (`newadj site approve`), so that the site's runtime takes part in the project's runs."""
    from client.bundles import approve

    (Path(site) / "policy.toml").write_text(text)
    approve(Path(site), project_bundle()[0])


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

    return load_config(LOCAL_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, test_cfg) -> Path:
    """Seven sites (six train + external) of ~8-12 patients, with every site's cache built."""
    from common.data.cohort import discover_sites
    from common.preprocess.cache import ensure_caches
    from common.config import to_plain
    from common.synth import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, seed=3, scale=0.06, cfg=to_plain(test_cfg.synth), progress=False)
    for site in discover_sites(out):
        write_site_policy(site.path)
    ensure_caches(discover_sites(out), test_cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A small site folder from tests/sitebuilder.py (NIfTI, DICOM, pyramidal TIFF), built once."""
    from tests import sitebuilder as sb

    return sb.build_site(tmp_path_factory.mktemp("template") / "site")


@pytest.fixture
def site(template, tmp_path) -> Path:
    """A fresh copy of the template site for one test to change."""
    import shutil

    dst = tmp_path / "site"
    shutil.copytree(template, dst)
    return dst


@pytest.fixture()
def flwr_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def pytest_configure(config):
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"    # no test process reports usage to Flower


def pytest_runtest_setup(item):
    """``NEWADJ_TEST_DEADLINE`` (epoch seconds, set by .ci/run for the slow tier): a test that would start
    after it is skipped, saying so, so that the CI job ends inside its time limit."""
    import time

    deadline = os.environ.get("NEWADJ_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("not started: the CI job's time budget for the slow tier is spent (NEWADJ_TEST_DEADLINE)")
