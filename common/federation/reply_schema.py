"""The one schema of what a center's reply may hold (keys of its MetricRecord and ConfigRecord).

The ClientApp writes these keys, the site policy's default whitelists are these
(``conf/policy/default.yaml``: ``metric_keys`` / ``info_keys`` null), the server and the
reports read them, and the tests check against them.  Adding a metric a center sends
starts here.  No torch or Flower import: the policy reads it on every message.
"""
from __future__ import annotations

# Patterns use fnmatch (`td-*-edges`: one per DFS horizon).

TRAIN_METRICS = ("num-examples", "train-loss", "train-seconds", "samples-per-s", "n-skipped", "rss-mb")
# benefit endpoint: released score cells per label, confusion counts at a cell edge
BENEFIT_CELLS = ("hist-edges", "hist-neg", "hist-pos")
CONFUSION = ("tp", "fp", "tn", "fn")
BENEFIT_METRICS = ("n-pos", "abstained", *BENEFIT_CELLS, "loss", "threshold-used", *CONFUSION)
# DFS endpoint: Harrell's pair counts and their jackknife variance components (common.metrics.PAIR_KEYS)
PAIR_WIRE = {"concordant": "c-conc", "discordant": "c-disc", "tied_risk": "c-tied", "comparable": "c-pairs",
             "var_n": "c-var-n", "cov_nd": "c-cov-nd", "var_d": "c-var-d"}
DFS_METRICS = ("dfs-abstained", "n-dfs", "n-events", *PAIR_WIRE.values())


def td_keys(horizon: float) -> tuple[str, str, str]:
    """(edges, controls, cases) keys of the time-dependent AUC cells at ``horizon`` months."""
    h = f"{float(horizon):g}"
    return f"td-{h}-edges", f"td-{h}-neg", f"td-{h}-pos"


# the baseline hazard of the selected model (piecewise constant): cells of events and exposure;
# with it, the cells of every patient's risk score (its tertiles become the model's risk groups)
HAZARD_CELLS = ("hz-edges", "hz-events", "hz-exposure")
RISK_CELLS = ("risk-edges", "risk-counts")
# a full report (one per run, the external center): value, -lo, -hi of each
FULL_REPORT = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "brier", "ece", "c_index", "ibs",
               "brier_calibrated", "ece_calibrated")   # the last two: after the run's Platt scaling
FULL_REPORT_DFS = ("c_index", "ibs")                 # of the DFS endpoint; the others are the benefit endpoint's
# point values of a full report (the value key only, no -lo/-hi): the ECE a perfectly calibrated model with the
# site's own probabilities would show on that many patients (common.metrics.ece_floor); the ECE is read against it
FULL_REPORT_POINTS = ("ece_floor", "ece_calibrated_floor")
# entries (value, -lo, -hi) newer than some sites' own metric_keys lists, sent only where the site's whitelist has
# them: the calibration intercept and slope (common.metrics.calibration_intercept_slope; 0 and 1 when calibrated)
FULL_REPORT_LISTED = ("cal_intercept", "cal_slope")
CAL_GROUPS = ("all", "low", "mid", "high")          # predicted-risk tertiles


def full_report_keys(name: str) -> tuple[str, str, str]:
    return name, f"{name}-lo", f"{name}-hi"


def td_auc_key(horizon: float) -> str:
    return f"td-auc-{float(horizon):g}"


def calibration_key(horizon: float, group: str, stat: str) -> str:
    """Predicted (``pred``) or Kaplan-Meier (``obs``, ``obs-lo``, ``obs-hi``) DFS at ``horizon`` in ``group``."""
    return f"dfs-cal-{float(horizon):g}-{group}-{stat}"


METRIC_KEY_PATTERNS = (
    *TRAIN_METRICS, *BENEFIT_METRICS, *DFS_METRICS, "td-*-edges", "td-*-neg", "td-*-pos",
    *HAZARD_CELLS, *RISK_CELLS, *(k for n in FULL_REPORT + FULL_REPORT_LISTED for k in full_report_keys(n)), *FULL_REPORT_POINTS, "td-auc-*", "dfs-cal-*",
)
# the role query: identity, split sizes, endpoint counts above the site's floors (0 below)
QUERY_INFO = ("role", "center-id", "n-train", "n-val", "n-test", "n-benefit", "n-dfs")
# the schema query (`newadj schema`): column names and how many patients have each (above the floor)
# per column, over the patients counted (none below the floor): sums of x, x^2, log1p(x), log1p(x)^2 and
# whether every value is >= 0 -- the pooled moments that standardise the features (data.scaling)
MOMENTS = ("sum", "sumsq", "logsum", "logsumsq", "nonneg")
SCHEMA_INFO = ("genomic-columns", "genomic-counts", "clinical-columns", "clinical-counts", "modality-names",
               "modality-counts", "n-patients", *(f"{kind}-{m}" for kind in ("genomic", "clinical") for m in MOMENTS))
INFO_KEYS = (*QUERY_INFO, *SCHEMA_INFO, "notice")

# What an error reply from a site may say: a fixed code and its category, never exception text, a cell value
# or a patient id (the full text stays in the site's own log, under the message id the reply names).
# A policy refusal (403) also names the rule or the run keys it refused: texts the site's code writes, with
# no value from its data or from the refused request.
ERR_REFUSED = 403          # the site's policy refused the request
ERR_DATA_CHANGED = 409     # the site's data changed after the run loaded it
ERR_BUNDLE = 412           # the run's app bundle is not one this site approved
ERR_INTERNAL = 500         # the site failed to answer; the category says where
ERROR_CATEGORIES = {
    ERR_REFUSED: "refused by the site's policy",
    ERR_DATA_CHANGED: "site data changed since the run loaded it",
    ERR_BUNDLE: "app bundle not approved by this site",
    ERR_INTERNAL: "internal error at the site",
}
# the part of an internal error the coordinator may read: a category by the kind of failure
INTERNAL_CATEGORIES = ("data or configuration", "file access", "memory", "computation", "other")
