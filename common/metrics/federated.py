"""Pooled metrics from what sites release: score histograms and merged cells (AUC with exact bounds,
Youden threshold, quantiles) -- no per-patient score leaves a site."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from common.metrics._base import _NAN, _as_float, _finite_pair  # noqa: F401


# --------------------------------------------------------------------------- #
# pooled AUC from aggregate statistics (federated, no per-patient scores)
# --------------------------------------------------------------------------- #
def score_histogram(y_true: Any, y_prob: Any, bins: int = 20) -> np.ndarray:
    """Per-class counts of scores in ``bins`` equal-width bins over [0, 1].

    Returns an int64 array of shape ``(2, bins)``: row 0 = negatives, row 1 =
    positives.  Bin ``b`` holds scores in ``[b/bins, (b+1)/bins)`` (the last
    bin also holds 1.0); scores are clipped to [0, 1] and entries with a
    non-finite label or score are dropped.  The bin index ``floor(p * bins)``
    is monotone in ``p``, so the bin order is consistent with the score order,
    which is what makes the bounds of :func:`auc_from_histograms` exact.
    Histograms from several sites add up element-wise (:func:`pool_histograms`).
    """
    bins = int(bins)
    if bins < 1:
        raise ValueError("bins must be a positive integer")
    y, p = _finite_pair(y_true, y_prob)
    p = np.clip(p, 0.0, 1.0)
    idx = np.minimum(np.floor(p * bins).astype(np.int64), bins - 1)
    hist = np.zeros((2, bins), dtype=np.int64)
    hist[0] = np.bincount(idx[y == 0], minlength=bins)
    hist[1] = np.bincount(idx[y == 1], minlength=bins)
    return hist


def pool_histograms(hists: Sequence[Any]) -> np.ndarray:
    """Element-wise sum of per-site histograms (all with the same binning)."""
    arrs = [np.asarray(h, dtype=np.int64) for h in hists]
    if not arrs:
        raise ValueError("no histograms to pool")
    shape = arrs[0].shape
    if len(shape) != 2 or shape[0] != 2 or any(a.shape != shape for a in arrs):
        raise ValueError("histograms must all have shape (2, n_bins)")
    return np.sum(arrs, axis=0)


def _hist_parts(hist: Any) -> tuple[np.ndarray, np.ndarray, float, float]:
    h = np.asarray(hist, dtype=float)
    if h.ndim != 2 or h.shape[0] != 2:
        raise ValueError("hist must have shape (2, n_bins)")
    if np.any(h < 0):
        raise ValueError("hist counts must be non-negative")
    return h[0], h[1], float(h[0].sum()), float(h[1].sum())


def auc_from_histograms(hist: Any) -> tuple[float, float, float]:
    """AUC estimate and exact bounds from a ``(2, n_bins)`` score histogram.

    Let ``neg_b``/``pos_b`` be the counts in bin ``b`` (bins ordered by score),
    ``N = sum neg_b``, ``P = sum pos_b``,
    ``C = sum_b pos_b * sum_{b' < b} neg_b'`` (pairs whose positive lies in a
    strictly higher bin: concordant whatever the exact scores) and
    ``T = sum_b neg_b * pos_b`` (pairs sharing a bin: order unknown).

    * estimate ``= (C + T/2) / (N P)`` -- the exact Mann-Whitney AUC of the
      binned scores (within-bin pairs count as ties, i.e. half-concordant);
      equals the trapezoidal area under :func:`roc_from_histograms`.
    * lower ``= C / (N P)`` (every within-bin pair discordant) and
      upper ``= (C + T) / (N P)`` (every within-bin pair concordant).

    Each within-bin pair contributes between 0 and 1 to the exact AUC (ties in
    the raw scores count 1/2), so the exact AUC of the unbinned scores is
    guaranteed to satisfy ``lower <= AUC_exact <= upper``, and

        |estimate - AUC_exact| <= 0.5 * (sum_b neg_b * pos_b) / (N * P).

    Because counts simply add up, the histogram pooled over sites gives the
    same result as binning the pooled scores.  Returns ``(NaN, NaN, NaN)``
    when either class is empty.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    if n_neg == 0 or n_pos == 0:
        return (_NAN, _NAN, _NAN)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives strictly lower
    conc = float(np.sum(pos * below))
    ties = float(np.sum(pos * neg))
    denom = n_neg * n_pos
    return ((conc + 0.5 * ties) / denom, conc / denom, (conc + ties) / denom)


def roc_from_histograms(hist: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve from a ``(2, n_bins)`` histogram, thresholds at bin edges.

    Point ``k`` (k = 0..n_bins) predicts positive every bin with index
    ``>= n_bins - k``; so ``fpr``/``tpr`` run from (0, 0) to (1, 1), are
    non-decreasing and have ``n_bins + 1`` points.  The trapezoidal area under
    the curve equals the estimate of :func:`auc_from_histograms`.  Arrays are
    NaN when a class is empty.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    cum_neg = np.concatenate([[0.0], np.cumsum(neg[::-1])])
    cum_pos = np.concatenate([[0.0], np.cumsum(pos[::-1])])
    fpr = cum_neg / n_neg if n_neg > 0 else np.full(cum_neg.shape, np.nan)
    tpr = cum_pos / n_pos if n_pos > 0 else np.full(cum_pos.shape, np.nan)
    return fpr, tpr


def youden_from_histograms(hist: Any, default: float = 0.5) -> float:
    """Youden threshold chosen on a pooled ``(2, n_bins)`` histogram.

    Candidate thresholds are the bin edges ``(n_bins - k) / n_bins`` of
    :func:`roc_from_histograms` (predict positive when ``p >= threshold``);
    returns ``default`` when a class is empty.  Ties go to the highest threshold.
    """
    neg, pos, n_neg, n_pos = _hist_parts(hist)
    if n_neg == 0 or n_pos == 0:
        return float(default)
    fpr, tpr = roc_from_histograms(hist)
    n_bins = len(neg)
    j = tpr - fpr
    k = int(np.argmax(j[1:n_bins])) + 1 if n_bins > 1 else 1
    return float((n_bins - k) / n_bins)


# --------------------------------------------------------------------------- #
# pooled AUC from released cells (histograms whose bins were merged at the site)
# --------------------------------------------------------------------------- #
def _cell_arrays(cells: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, neg, pos) of every cell of every ``(edges, neg, pos)`` histogram."""
    lo, hi, neg, pos = [], [], [], []
    for edges, n, m in cells:
        e = np.asarray(edges, dtype=float)
        n, m = np.asarray(n, dtype=float), np.asarray(m, dtype=float)
        if e.ndim != 1 or len(e) != len(n) + 1 or len(n) != len(m) or np.any(np.diff(e) <= 0):
            raise ValueError("each histogram needs increasing edges (len m+1) and m counts per label")
        if np.any(n < 0) or np.any(m < 0):
            raise ValueError("hist counts must be non-negative")
        lo.append(e[:-1]), hi.append(e[1:]), neg.append(n), pos.append(m)
    if not lo:
        raise ValueError("no histograms")
    return np.concatenate(lo), np.concatenate(hi), np.concatenate(neg), np.concatenate(pos)


def _spread(lo, hi, counts, grid) -> np.ndarray:
    """Counts of cells spread uniformly (by length) over the sub-intervals of ``grid``."""
    out = np.zeros(len(grid) - 1)
    for a, b, c in zip(lo, hi, counts):
        if c == 0:
            continue
        i, j = np.searchsorted(grid, a), np.searchsorted(grid, b)
        widths = np.diff(grid[i:j + 1])
        out[i:j] += c * widths / widths.sum()
    return out


def auc_from_cells(cells: Sequence[tuple]) -> tuple[float, float, float]:
    """AUC estimate and exact bounds from per-site histograms with site-specific cells.

    ``cells``: one ``(edges, neg, pos)`` per site; a site's cells are intervals
    ``[edges[i], edges[i+1])`` of score (the last one closed) with its negative / positive
    counts.  A pair (negative in cell I, positive in cell J) is concordant whatever the
    exact scores when ``J`` starts at or above the end of ``I``, discordant when ``J``
    ends at or below the start of ``I``, and unknown otherwise, so

    * lower = (sure concordant pairs) / (N P), upper = 1 - (sure discordant pairs) / (N P)
      bound the exact AUC of the unreleased scores;
    * the estimate spreads every cell uniformly over the common refinement of all edges
      and takes the Mann-Whitney AUC with within-bin ties as 1/2.  When every site uses
      the same bins this is exactly :func:`auc_from_histograms`.
    """
    lo, hi, neg, pos = _cell_arrays(cells)
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    if n_neg == 0 or n_pos == 0:
        return (_NAN, _NAN, _NAN)
    denom = n_neg * n_pos
    sure_conc = float(np.sum(np.outer(neg, pos) * (lo[None, :] >= hi[:, None])))
    sure_disc = float(np.sum(np.outer(neg, pos) * (hi[None, :] <= lo[:, None])))
    grid = np.unique(np.concatenate([lo, hi]))
    est = auc_from_histograms(np.vstack([_spread(lo, hi, neg, grid), _spread(lo, hi, pos, grid)]))[0]
    return (float(est), sure_conc / denom, 1.0 - sure_disc / denom)


def quantiles_from_cells(cells: Sequence[tuple], qs: Sequence[float]) -> list[float]:
    """Quantiles of scores released as ``(edges, counts)`` cells by several sites (uniform within a cell)."""
    lo, hi, counts, _ = _cell_arrays([(e, c, np.zeros(len(c))) for e, c in cells])
    grid = np.unique(np.concatenate([lo, hi]))
    mass = _spread(lo, hi, counts, grid)
    cdf = np.concatenate([[0.0], np.cumsum(mass)]) / max(mass.sum(), 1e-12)
    return [float(np.interp(q, cdf, grid)) for q in qs]


def youden_from_cells(cells: Sequence[tuple], default: float = 0.5) -> float:
    """Youden threshold on pooled site histograms: a cell edge strictly inside (0, 1).

    Sensitivity and specificity at an edge are exact for the sites whose cells have that
    edge and spread uniformly for the others; ties go to the highest threshold.
    """
    lo, hi, neg, pos = _cell_arrays(cells)
    if neg.sum() == 0 or pos.sum() == 0:
        return float(default)
    grid = np.unique(np.concatenate([lo, hi]))
    n, m = _spread(lo, hi, neg, grid), _spread(lo, hi, pos, grid)
    best, best_j = float(default), -np.inf
    for i in range(len(grid) - 2, 0, -1):        # interior edges, highest first
        tpr, fpr = m[i:].sum() / m.sum(), n[i:].sum() / n.sum()
        if tpr - fpr > best_j + 1e-12:
            best, best_j = float(grid[i]), tpr - fpr
    return best
