"""The server side of the exact federated Cox model (``model=cox``): Newton-Raphson on the centers' sums.

Every round sends each training center one TRAIN message with the coefficients of every fit still
moving (a ``betas`` array, one row per fit) and gets back the derivatives of its own partial
log-likelihood at each (``client_app.newton_reply``), over all its patients.  The server sums them
over the centers each fit trains on, adds the ridge penalty and takes a Newton step per fit
(``common.learn.cox``).  With a list of penalizers, the fit on every center and the fits that leave
one center out move together for every penalizer, so the leave-one-center-out cross-validation costs
no extra rounds: about as many rounds as one fit needs (5-8 to 1e-10), with (centers + 1) x
penalizers coefficient vectors per message.  What a center releases per round: for each vector, one
gradient, one Hessian and one log-likelihood, each a sum over all its patients.

A center that fails a round drops out of the fit: the sums then cover the others, every fit goes on
from where it is (the fit that left it out is dropped), and the run says so.
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
    from common.config import to_plain

    pen = to_plain(cox_cfg.penalizer)
    values = [float(v) for v in (pen if isinstance(pen, list) else [pen])]
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"model.cox.penalizer must be a number >= 0 or a list of them, got {pen!r}")
    return values


def feature_names(cfg) -> list[str]:
    return [str(g) for g in cfg.data.genomic_features] + [str(c) for c in cfg.data.clinical_features]


def fit_cox(grid, roles, cfg, events, timeout: float) -> dict:
    """Fit the federation's Cox model (choosing the penalizer by leave-one-center-out CV when given several);
    returns the coefficients, their table, the CV curve, per-round records and the communication."""
    cc = cfg.model.cox
    names = feature_names(cfg)
    p = len(names)
    lambdas = penalizer_grid(cc)
    tol, max_rounds = float(cc.tol), int(cc.max_rounds)
    contributors: list[str] | None = None   # the centers whose strata make up the fit, fixed at round 1
    fits: list[Fit] = []
    history, comm, dropped = [], {"bytes_sent": 0, "bytes_received": 0}, {}
    per_center: dict = {}
    for rnd in range(1, max_rounds + 1):
        active = [fit for fit in fits if not fit.converged] if fits else [Fit(lam, None, np.zeros(p)) for lam in lambdas]
        if not active:
            break
        t0 = time.perf_counter()
        train_ids, _ = membership(grid, roles)
        ids = [n for n in train_ids if contributors is None or center_name(roles, n) in contributors]
        good, failures = _newton_round(grid, roles, ids, np.stack([fit.beta for fit in active]), rnd, timeout, comm)
        if len(good) < int(cfg.federation.min_train_nodes):
            raise RuntimeError(f"cox round {rnd}: {len(good)} training centers answered < "
                               f"federation.min_train_nodes={cfg.federation.min_train_nodes} "
                               f"({'; '.join(f'{c}: {w}' for c, w in sorted(failures.items())) or 'no reply'})")
        parts = _replies(good, len(active), p)
        if contributors is None:     # round 1: every fit is at 0; the leave-one-center-out fits start here too
            contributors = sorted(good)
            per_center = {c: {"n": parts[c]["n"], "events": parts[c]["events"]} for c in contributors}
            cv = len(lambdas) > 1
            if cv and len(contributors) < 3:
                raise RuntimeError(f"model.cox.penalizer lists {len(lambdas)} values: choosing among them by "
                                   f"leave-one-center-out CV needs 3 training centers, {len(contributors)} answered")
            fits = [f for lam in lambdas for f in
                    [Fit(lam, None, np.zeros(p)), *(Fit(lam, c, np.zeros(p)) for c in (contributors if cv else []))]]
            active = fits
            parts = {c: {**v, **_expand(v, len(lambdas), len(fits) // len(lambdas))} for c, v in parts.items()}
        if failures:               # the fit goes on over the others; no step is compared across the change
            for c, why in failures.items():
                dropped[c] = why
            contributors = [c for c in contributors if c not in failures]
            for fit in active:
                fit.step, fit.loglik = None, -np.inf
                if fit.held_out in failures:
                    fit.converged, fit.cv_term = True, float("nan")   # its held-out center is gone
        for m, fit in enumerate(active):
            if fit.held_out in dropped:
                continue
            train = [c for c in contributors if c != fit.held_out]
            ll = sum(parts[c]["loglik"][m] for c in train)
            grad = sum(parts[c]["gradient"][m] for c in train)
            hess = sum(parts[c]["hessian"][m] for c in train)
            newton_update(fit, ll, grad, hess, sum(per_center[c]["n"] for c in train), tol)
            if fit.converged and fit.held_out is not None:
                fit.cv_term = float(parts[fit.held_out]["loglik"][m])   # the held-out center at the fit of the others
        rec = {"round": rnd, "fits_moving": sum(not f.converged for f in fits), "centers": sorted(good),
               "failures": failures, "seconds": time.perf_counter() - t0}
        history.append(rec)
        events("note", text=f"cox round {rnd}: {len(active)} fits sent, {rec['fits_moving']} still moving")
    unconverged = [f for f in fits if not f.converged]
    if unconverged:
        log.warning("cox: %d of %d fits did not converge in %d rounds (model.cox.max_rounds); their last point is used",
                    len(unconverged), len(fits), max_rounds)
    cv_on = len(lambdas) > 1
    cv = []
    for lam in lambdas:
        terms = [f.cv_term for f in fits if f.penalizer == lam and f.held_out is not None and f.held_out in contributors]
        cv.append({"penalizer": lam, "cv_partial_loglik": float(np.sum(terms)) if cv_on else None,
                   "converged": all(f.converged for f in fits if f.penalizer == lam)})
    chosen = max(cv, key=lambda r: r["cv_partial_loglik"])["penalizer"] if cv_on else lambdas[0]
    final = next(f for f in fits if f.penalizer == chosen and f.held_out is None)
    table = coefficient_table(names, final.beta, -final.hessian, float(cc.alpha))
    n_total = sum(per_center[c]["n"] for c in contributors)
    log.info("cox: penalizer %g (%s); %d rounds; %d centers, %d patients", chosen,
             f"leave-one-center-out CV over {len(lambdas)} values" if cv_on else "fixed", len(history),
             len(contributors), n_total)
    return {"beta": [float(b) for b in final.beta], "penalizer": chosen,
            "cv": cv, "cv_basis": "leave-one-center-out" if cv_on else None, "coefficients": table,
            "rounds": len(history), "history": history, "converged": final.converged, "patients": n_total,
            "centers": {c: per_center[c] for c in contributors}, "dropped_centers": dropped, "communication": comm,
            "penalised_loglik": final.loglik}


def _newton_round(grid, roles, node_ids, betas: np.ndarray, rnd: int, timeout: float, comm: dict) -> tuple[dict, dict]:
    """Send the coefficient vectors ``betas`` to the nodes; ({center: reply}, {center: why it failed}), bytes
    counted in ``comm``."""
    arrays = ArrayRecord({"betas": Array(betas.astype(np.float64))})
    msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"newton": True, "server-round": rnd})}),
                    message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]
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
    return good, failures


def _expand(part: dict, n_lambdas: int, per_lambda: int) -> dict:
    """Round 1 sent one vector per penalizer (all zeros); every fit of a penalizer starts from its answer."""
    idx = np.repeat(np.arange(n_lambdas), per_lambda)
    return {k: part[k][idx] for k in ("loglik", "gradient", "hessian")}


def _replies(replies: dict, m: int, p: int) -> dict:
    """{center: its loglik [m], gradient [m, p], Hessian [m, p, p], patients and events} from its reply."""
    out = {}
    for c in sorted(replies):
        a = replies[c].content["arrays"]
        part = {key: np.asarray(a[key].numpy(), float) for key in ("loglik", "gradient", "hessian")}
        if part["gradient"].shape != (m, p) or part["hessian"].shape != (m, p, p) or part["loglik"].shape != (m,):
            raise RuntimeError(f"center {c} answered a Newton round with arrays of the wrong shape")
        metrics = replies[c].content["metrics"]
        out[c] = {**part, "n": int(metrics["num-examples"]), "events": int(metrics["n-events"])}
    return out
