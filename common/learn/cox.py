"""The exact federated Cox model (``model=cox``): what a center computes, and what the server solves.

A ridge-penalised Cox proportional-hazards model on the tabular inputs (the genomic and
clinical features, scaled as the feature file says, 0 where missing), stratified by center:
the log partial likelihood of the federation is the sum of each center's own (Efron ties),
so its gradient and Hessian are the sums of the centers' (as in WebDISCO, Lu et al. 2015, and
FedECA, du Terrail et al. 2023).  The server runs Newton-Raphson on those sums,

    maximise  sum_s l_s(beta) - N * penalizer / 2 * ||beta||^2      (N: patients in the fit),

which is lifelines' ``CoxPHFitter(penalizer, l1_ratio=0, strata=center)`` objective on the same
inputs, with lifelines' per-covariate normalisation undone (its ``penalizer`` applies to
coefficients of covariates divided by their SD: ``penalizer / sd**2`` per covariate gives this one).

The penalizer is chosen by federated leave-one-center-out cross-validation: for each candidate
penalizer and each training center h the federation also fits on the other centers, and h's own log
partial likelihood at that fit is its out-of-center contribution; the penalizer with the largest sum
wins (the cross-validated partial likelihood of Verweij & van Houwelingen, 1993, with centers as
folds, since the model is for a center it never saw).  A center only ever computes derivatives over
all its own patients, at the coefficients it is sent: no release covers a subset of a site, so no two
releases differ by fewer patients than its floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np



# --------------------------------------------------------------------------- at a center

def design(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(X [n, p], time, event, patient ids) of a dataset's patients with DFS, X = [genomics, clinical] inputs."""
    rows, t, e, ids = [], [], [], []
    for it in ds.items:
        if not (np.isfinite(it["dfs_time"]) and np.isfinite(it["dfs_event"])):
            continue
        rows.append(np.concatenate([np.asarray(it["genomics"], float), np.asarray(it["clinical"], float)]))
        t.append(float(it["dfs_time"]))
        e.append(float(it["dfs_event"]))
        ids.append(str(it["patient_id"]))
    p = int(getattr(ds, "n_genes", 0)) + int(getattr(ds, "n_clinical", 0))
    X = np.vstack(rows) if rows else np.zeros((0, p))
    return X, np.asarray(t, float), np.asarray(e, float), ids


def efron_derivatives(X: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray
                      ) -> tuple[float, np.ndarray, np.ndarray]:
    """(log partial likelihood, its gradient [p], its Hessian [p, p]) at ``beta``, Efron's ties.

    With risk set R_j of event time u_j, tied events D_j (d_j of them), theta = exp(x beta) and
    S^k_A = sum_A theta x^(k) (k = 0, 1, 2):
    l = sum_j [sum_{D_j} x beta - sum_{l<d_j} log(S0_R - l/d_j S0_D)], and the gradient and Hessian
    follow term by term (Efron 1977; lifelines' ``_get_efron_values_single`` computes the same).
    """
    X, time, event, beta = (np.asarray(a, float) for a in (X, time, event, beta))
    n, p = X.shape
    if n == 0 or not event.any():
        return 0.0, np.zeros(p), np.zeros((p, p))
    eta = X @ beta
    shift = float(eta.max())
    theta = np.exp(eta - shift)
    order = np.argsort(-time, kind="stable")            # descending time: risk sets are prefixes
    t_desc = time[order]
    c0 = np.cumsum(theta[order])
    tx = theta[:, None] * X
    c1 = np.cumsum(tx[order], axis=0)
    c2 = np.cumsum(np.einsum("i,ij,ik->ijk", theta, X, X)[order], axis=0)
    ll, grad, hess = 0.0, np.zeros(p), np.zeros((p, p))
    for u in np.unique(time[event > 0]):
        last = int(np.searchsorted(-t_desc, -u, side="right")) - 1     # the last index with time >= u
        dmask = (time == u) & (event > 0)
        d = int(dmask.sum())
        s0d, s1d = theta[dmask].sum(), tx[dmask].sum(0)
        s2d = np.einsum("i,ij,ik->jk", theta[dmask], X[dmask], X[dmask])
        ll += float(eta[dmask].sum())
        grad += X[dmask].sum(0)
        for lt in range(d):
            f = lt / d
            phi = c0[last] - f * s0d
            m = (c1[last] - f * s1d) / phi
            ll -= math.log(phi) + shift
            grad -= m
            hess -= (c2[last] - f * s2d) / phi - np.outer(m, m)
    return ll, grad, hess


def site_derivatives(X, time, event, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log-likelihoods [M], gradients [M, p], Hessians [M, p, p]) of a center's patients at each of ``betas``."""
    M, p = betas.shape
    ll, g, h = np.zeros(M), np.zeros((M, p)), np.zeros((M, p, p))
    for m in range(M):
        ll[m], g[m], h[m] = efron_derivatives(X, time, event, betas[m])
    return ll, g, h


# --------------------------------------------------------------------------- at the server

@dataclass
class Fit:
    """One penalised fit the server drives: its penalizer, the center it leaves out (None: none) and its state."""
    penalizer: float
    held_out: str | None
    beta: np.ndarray
    loglik: float = -np.inf          # penalised, at ``beta``
    step: np.ndarray | None = None   # the last Newton step taken to reach ``beta``
    converged: bool = False
    steps: int = 0
    halvings: int = 0
    hessian: np.ndarray | None = None    # penalised, at ``beta``
    cv_term: float = float("nan")        # the held-out center's log partial likelihood at the converged ``beta``
    history: list = field(default_factory=list)


def penalised(loglik: float, grad: np.ndarray, hess: np.ndarray, beta: np.ndarray, n: int, penalizer: float):
    """The ridge-penalised log-likelihood, gradient and Hessian (``n * penalizer / 2 * ||beta||^2``)."""
    lam = float(n) * float(penalizer)
    return (loglik - 0.5 * lam * float(beta @ beta), grad - lam * beta, hess - lam * np.eye(len(beta)))


def newton_update(fit: Fit, loglik: float, grad: np.ndarray, hess: np.ndarray, n: int, tol: float) -> None:
    """One Newton-Raphson move of ``fit`` from the summed (unpenalised) derivatives at ``fit.beta``.

    A step that lowered the penalised log-likelihood is halved and retried from the previous point
    (the derivatives there are not needed again: the step is kept).  Converged when the largest
    coefficient change is below ``tol``.
    """
    pl, pg, ph = penalised(loglik, grad, hess, fit.beta, n, fit.penalizer)
    if fit.step is not None and pl < fit.loglik - 1e-12 * max(1.0, abs(fit.loglik)) and fit.halvings < 30:
        fit.step = fit.step / 2.0                # overshot: back up half way
        fit.beta = fit.beta - fit.step
        fit.halvings += 1
        return
    fit.loglik, fit.hessian = pl, ph
    step = np.linalg.solve(ph, -pg)
    fit.history.append({"loglik": pl, "max_step": float(np.max(np.abs(step))) if len(step) else 0.0})
    if not len(step) or np.max(np.abs(step)) < tol:
        fit.converged = True
        return
    fit.step = step
    fit.beta = fit.beta + step
    fit.steps += 1


def coefficient_table(names: list[str], beta: np.ndarray, neg_hessian_pen: np.ndarray, alpha: float = 0.05) -> list[dict]:
    """Coefficients, hazard ratios and Wald confidence intervals from the inverse penalised information (the
    variance lifelines reports for a penalised fit), per covariate in model-input units."""
    from scipy.stats import norm

    cov = np.linalg.inv(neg_hessian_pen)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    z = norm.ppf(1 - alpha / 2)
    rows = []
    for j, name in enumerate(names):
        b, s = float(beta[j]), float(se[j])
        rows.append({"covariate": name, "coef": b, "se": s, "hr": math.exp(b), "hr_lo": math.exp(b - z * s),
                     "hr_hi": math.exp(b + z * s), "z": b / s if s > 0 else float("nan"),
                     "p": float(2 * norm.sf(abs(b / s))) if s > 0 else float("nan")})
    return rows
