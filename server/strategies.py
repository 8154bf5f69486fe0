"""Flower's own strategies, chosen and parameterised by ``conf/federation``."""
from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi

STRATEGY_STATE = ("m_t", "v_t")  # FedOpt moments, saved in checkpoints for an exact resume


def build_strategy(fed):
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(fed.min_train_nodes),
                  min_evaluate_nodes=0, min_available_nodes=int(fed.min_available_nodes))
    name = str(fed.strategy).lower()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=float(fed.proximal_mu), **common)
    if name in ("fedadam", "fedyogi"):
        o = fed.fedopt
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(eta=float(o.eta), eta_l=float(o.eta_l), beta_1=float(o.beta_1), beta_2=float(o.beta_2),
                   tau=float(o.tau), **common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=float(fed.trimmed_beta), **common)
    raise ValueError(f"federation.strategy={fed.strategy!r}: choose fedavg, fedprox, fedadam, fedyogi, "
                     "fedmedian or fedtrimmedavg")


def strategy_state(strategy) -> dict:
    return {k: getattr(strategy, k) for k in STRATEGY_STATE if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy, state: dict) -> None:
    for k, v in state.items():
        setattr(strategy, k, v)
