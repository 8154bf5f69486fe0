"""The HTML reports render in a real browser (headless Chromium) with every plot visible.

Chromium is required: this test fails (does not skip) when it is missing --
install it with ``apt-get install -y chromium``.  Screenshots are kept under
``test-artifacts/`` in the repository root.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_evaluate import fake_run, median_threshold_package

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

PROBE = """<script>
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (img) {
    var r = img.getBoundingClientRect(), st = getComputedStyle(img);
    img.setAttribute('data-nw', img.naturalWidth);
    img.setAttribute('data-nh', img.naturalHeight);
    img.setAttribute('data-visible', (r.width > 0 && r.height > 0 && st.display !== 'none'
                                     && st.visibility !== 'hidden' && img.complete) ? '1' : '0');
  });
  document.body.setAttribute('data-probed', '1');
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        pytest.fail("headless Chromium is required for the report browser test but is not installed: "
                    "run `apt-get install -y chromium` (CI installs it)")
    return exe


def _flags(tmp: Path) -> list[str]:
    return [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1280,4000"]


def render(html_file: Path, screenshot: Path, tmp: Path) -> list[dict]:
    """Screenshot the page, then dump the DOM of a probed copy; returns one dict per <img>."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(_flags(tmp) + [f"--screenshot={screenshot}", html_file.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, r.stderr[-2000:]
    probe = tmp / f"{html_file.stem}-probe.html"
    probe.write_text(html_file.read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run(_flags(tmp) + ["--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
                                      "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert 'data-probed="1"' in dom, f"probe script did not run; chromium said: {r.stderr[-2000:]}"
    imgs = []
    for tag in re.findall(r"<img\b[^>]*>", dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        imgs.append({"plot": attrs.get("data-plot"), "nw": int(attrs.get("data-nw", "0")),
                     "nh": int(attrs.get("data-nh", "0")), "visible": attrs.get("data-visible") == "1",
                     "inline": attrs.get("src", "").startswith("data:image/png;base64,")})
    return imgs


def assert_self_contained(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "external resource in report"
    assert "url(http" not in html and "@import" not in html


def test_evaluation_report_renders(tiny_cohort, tmp_path):
    from common.reports.evaluate import evaluate_site

    site = tiny_cohort / "external"
    pkg = median_threshold_package(tmp_path / "model.pt", site)
    m = evaluate_site(pkg, site, tmp_path / "report")
    html_file = tmp_path / "report" / "report.html"
    assert_self_contained(html_file.read_text())
    imgs = render(html_file, ARTIFACTS / "evaluation_report.png", tmp_path)
    plots = {i["plot"]: i for i in imgs}
    assert set(plots) == {"roc", "reliability", "km"} == set(m["figures"])
    for name, i in plots.items():
        assert i["inline"], name
        assert i["nw"] > 100 and i["nh"] > 100, f"{name} image did not decode: {i}"
        assert i["visible"], f"{name} image not visible: {i}"


def test_run_report_renders(tiny_cohort, tmp_path):
    from common.reports.run_report import run_report

    pkg = median_threshold_package(tmp_path / "model.pt", tiny_cohort / "external")
    run, base = fake_run(tmp_path, pkg)
    out = run_report(run, base, tiny_cohort)
    assert_self_contained(out.read_text())
    imgs = render(out, ARTIFACTS / "run_report.png", tmp_path)
    plots = {i["plot"]: i for i in imgs}
    assert set(plots) == {"round-loss", "round-auc", "round-bytes", "round-time", "cross-site"}
    for name, i in plots.items():
        assert i["inline"] and i["nw"] > 100 and i["visible"], f"{name}: {i}"
