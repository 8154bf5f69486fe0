"""The server side of the exact federated Cox model (``model=cox``): Newton-Raphson on the centers' sums.

Every round sends each training center one TRAIN message with the current coefficients of every
fit still moving (a ``betas`` array, one row per fit, and ``fit-folds``: -1 for a fit on all the
center's patients, f for a fit that leaves fold f out) and gets back the derivatives of its own
partial log-likelihood (``client_app.newton_reply``).  The server sums them, adds the ridge
penalty and takes a Newton step per fit (``common.learn.cox``).  With a list of penalizers, the
full fits and the k fold fits of every penalizer move together, so the cross-validation costs no
extra rounds: about as many rounds as one fit needs (5-8 to 1e-10), at k+1 times the message size.
What a center releases per round: for each fit, one gradient, one Hessian and one or two
log-likelihoods, each a sum over at least its DFS floor of patients.

A center that fails a round drops out of the fit: the sums then cover the others, every fit goes on
from where it is, and the run says so (a stratified Cox model without that center).
"""
from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.learn.cox import Fit, coefficient_table, newton_update
from server.messaging import send_and_collect
from server.rounds import center_name, membership

log = logging.getLogger("newadj.server")


def penalizer_grid(cox_cfg) -> list[float]:
    pen = cox_cfg.penalizer
    values = [float(v) for v in (pen if isinstance(pen, (list, tuple)) or hasattr(pen, "__len__") and
                                 not isinstance(pen, str) else [pen])]
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"model.cox.penalizer must be a number >= 0 or a list of them, got {pen!r}")
    return values


def feature_names(cfg) -> list[str]:
    return [str(g) for g in cfg.data.genomic_features] + [str(c) for c in cfg.data.clinical_features]


def fit_cox(grid, roles, cfg, events, timeout: float) -> dict:
    """Fit the federation's Cox model (choosing the penalizer by federated k-fold CV when given several);
    returns the coefficients, their table, the CV curve, per-round records and the communication."""
    cc = cfg.model.cox
    names = feature_names(cfg)
    p = len(names)
    lambdas = penalizer_grid(cc)
    k = int(cc.cv_folds) if len(lambdas) > 1 else 0
    if len(lambdas) > 1 and k < 2:
        raise ValueError(f"model.cox.cv_folds must be >= 2 to choose among {len(lambdas)} penalizers")
    fits = [Fit(lam, f, np.zeros(p)) for lam in lambdas for f in [-1, *range(k)]]
    tol, max_rounds = float(cc.tol), int(cc.max_rounds)
    contributors: set[str] | None = None   # the centers whose strata make up the fit
    history, comm, dropped = [], {"bytes_sent": 0, "bytes_received": 0}, {}
    n_total, per_center = 0, {}
    for rnd in range(1, max_rounds + 1):
        active = [fit for fit in fits if not fit.converged]
        if not active:
            break
        t0 = time.perf_counter()
        train_ids, _ = membership(grid, roles)
        ids = [n for n in train_ids if contributors is None or center_name(roles, n) in contributors]
        arrays = ArrayRecord({"betas": Array(np.stack([fit.beta for fit in active]).astype(np.float64))})
        config = {"newton": True, "server-round": rnd, "cv-folds": k, "fit-folds": [fit.fold for fit in active]}
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), message_type=MessageType.TRAIN,
                        dst_node_id=n) for n in ids]
        replies = send_and_collect(grid, msgs, timeout)
        comm["bytes_sent"] += arrays.count_bytes() * len(msgs)
        good, failures = {}, {}
        for nid, r in replies.items():
            center = center_name(roles, nid)
            if r is None or r.has_error():
                failures[center] = "no reply before the round timeout" if r is None else r.error.reason
                log.error("cox round %d: center %s failed: %s", rnd, center, failures[center])
                continue
            comm["bytes_received"] += r.content["arrays"].count_bytes()
            good[center] = r
        if contributors is None:
            contributors = set(good)
        elif failures:                 # the fit goes on over the others; no step is compared across the change
            for fit in active:
                fit.step, fit.loglik = None, -np.inf
        for c, why in failures.items():
            dropped[c] = why
            contributors.discard(c)
        if len(good) < int(cfg.federation.min_train_nodes):
            raise RuntimeError(f"cox round {rnd}: {len(good)} training centers answered < "
                               f"federation.min_train_nodes={cfg.federation.min_train_nodes} "
                               f"({'; '.join(f'{c}: {w}' for c, w in sorted(failures.items())) or 'no reply'})")
        sums = _sum_replies(good, len(active), p)
        n_total = sums["n"]
        per_center = {c: {"n": int(r.content["metrics"]["num-examples"]),
                          "events": int(r.content["metrics"]["n-events"])} for c, r in sorted(good.items())}
        for m, fit in enumerate(active):
            newton_update(fit, sums["loglik"][m], sums["gradient"][m], sums["hessian"][m], sums["n_fit"][m], tol)
            if fit.fold >= 0 and fit.converged:
                fit.loglik_all = sums["loglik_all"][m] - sums["loglik"][m]   # this fold's CV contribution
        rec = {"round": rnd, "fits_moving": sum(not f.converged for f in fits), "centers": sorted(good),
               "failures": failures, "seconds": time.perf_counter() - t0}
        history.append(rec)
        events("note", text=f"cox round {rnd}: {len(active)} fits sent, {rec['fits_moving']} still moving")
    unconverged = [f for f in fits if not f.converged]
    if unconverged:
        log.warning("cox: %d of %d fits did not converge in %d rounds (model.cox.max_rounds); their last point is used",
                    len(unconverged), len(fits), max_rounds)
    cv = []
    for lam in lambdas:
        terms = [f.loglik_all for f in fits if f.penalizer == lam and f.fold >= 0]
        cv.append({"penalizer": lam, "cv_partial_loglik": float(np.sum(terms)) if k else None,
                   "converged": all(f.converged for f in fits if f.penalizer == lam)})
    chosen = max(cv, key=lambda r: r["cv_partial_loglik"])["penalizer"] if k else lambdas[0]
    final = next(f for f in fits if f.penalizer == chosen and f.fold == -1)
    table = coefficient_table(names, final.beta, -final.hessian, float(cc.alpha))
    log.info("cox: penalizer %g (%s); %d rounds; %d centers, %d patients", chosen,
             f"{k}-fold CV over {len(lambdas)} values" if k else "fixed", len(history), len(contributors or ()),
             n_total)
    return {"beta": [float(b) for b in final.beta], "penalizer": chosen, "cv_folds": k, "cv": cv, "coefficients": table,
            "rounds": len(history), "history": history, "converged": final.converged, "patients": n_total,
            "centers": per_center, "dropped_centers": dropped, "communication": comm,
            "penalised_loglik": final.loglik}


def _sum_replies(replies: dict, m: int, p: int) -> dict:
    """The summed derivatives of ``m`` fits over the centers' replies, in center order (a reproducible sum)."""
    out = {"loglik": np.zeros(m), "gradient": np.zeros((m, p)), "hessian": np.zeros((m, p, p)),
           "loglik_all": np.zeros(m), "n": 0, "n_fit": np.zeros(m)}
    for c in sorted(replies):
        a = replies[c].content["arrays"]
        parts = {key: np.asarray(a[key].numpy(), float) for key in ("loglik", "gradient", "hessian", "loglik-all",
                                                                      "n-fit")}
        if parts["gradient"].shape != (m, p) or parts["hessian"].shape != (m, p, p):
            raise RuntimeError(f"center {c} answered a Newton round with arrays of the wrong shape")
        out["loglik"] += parts["loglik"]
        out["gradient"] += parts["gradient"]
        out["hessian"] += parts["hessian"]
        out["loglik_all"] += np.nan_to_num(parts["loglik-all"])
        # the penalty scales with the patients in each fit: all of them, or the k-1 training folds of a fold fit
        out["n_fit"] += parts["n-fit"]
        out["n"] += int(replies[c].content["metrics"]["num-examples"])
    return out
