"""Flower's own strategies, chosen and parameterised by ``conf/federation``."""
from __future__ import annotations

from flwr.clientapp.mod.centraldp_mods import KEY_CLIPPING_NORM
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi)
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

STRATEGY_STATE = ("m_t", "v_t")  # FedOpt moments, saved in checkpoints for an exact resume
DP_WEIGHT = "dp-weight"          # uniform client weight under DP (set by the server on each reply)


def build_strategy(fed, n_train_centers: int | None = None):
    """The configured Flower strategy; wrapped in Flower's client-side fixed-clipping DP when enabled."""
    dp = fed.get("differential_privacy")
    if dp is not None and bool(dp.enabled):
        if str(fed.strategy).lower() not in ("fedavg", "fedprox"):
            raise ValueError(f"federation.differential_privacy needs fedavg or fedprox (Flower's accountant "
                             f"requires FedAvg aggregation), not {fed.strategy!r}")
        if not n_train_centers:
            raise ValueError("differential privacy needs the number of training centers")
        inner = _base_strategy(fed, weighted_by_key=DP_WEIGHT)
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=float(dp.target_delta), population_size=int(n_train_centers),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=None if dp.max_epsilon in (None, "") else float(dp.max_epsilon)))
        return CenterLevelDP(
            inner, noise_multiplier=float(dp.noise_multiplier), clipping_norm=float(dp.clipping_norm),
            num_sampled_clients=int(n_train_centers), accountant=accountant)
    return _base_strategy(fed)


class CenterLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP over the centers that are there this round.

    Flower's wrapper fixes ``num_sampled_clients`` once and raises in ``configure_train``
    when fewer nodes are connected, and drops the round (returns None) when one reply is
    missing or was rejected by the server's update screening.  Here the round's sample is
    the training centers the strategy addressed, and its release is the mean of the
    updates that passed screening: the noise is scaled to that count (std =
    noise_multiplier x clipping_norm / m) and the accountant records a release of m
    centers.  Nothing is released (and nothing accounted) in a round with no usable update.
    """

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = arrays
        config[KEY_CLIPPING_NORM] = self.clipping_norm      # the centers clip to it (fixedclipping_mod)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if messages:
            self.num_sampled_clients = len(messages)
        return self._prepare_accounting(server_round, messages)

    def aggregate_train(self, server_round, replies):
        good = [r for r in replies if not r.has_error()]
        event = self._pending_events.get(server_round)
        if good and event is not None and len(good) != event.sample_size:
            self._pending_events[server_round] = GaussianPrivacyEvent(
                noise_multiplier=event.noise_multiplier, sample_size=min(len(good), event.population_size),
                population_size=event.population_size)
        if good:
            self.num_sampled_clients = len(good)
        return super().aggregate_train(server_round, good)


def is_dp(strategy) -> bool:
    return isinstance(strategy, DifferentialPrivacyClientSideFixedClipping)


def privacy_spent(strategy) -> dict | None:
    """Cumulative (epsilon, delta) of a DP strategy so far (None: not a DP run)."""
    if not is_dp(strategy):
        return None
    spent = strategy.privacy_spent()
    dp = {"noise_multiplier": strategy.noise_multiplier, "clipping_norm": strategy.clipping_norm,
          "accounting": "rdp", "level": "center (client-level), uniform weights, no sampling amplification"}
    if spent is None or spent.num_releases == 0:
        return {**dp, "epsilon": 0.0, "delta": strategy.accountant.config.target_delta, "releases": 0}
    return {**dp, "epsilon": float(spent.epsilon), "delta": float(spent.delta), "releases": int(spent.num_releases)}


def _base_strategy(fed, weighted_by_key: str = "num-examples"):
    common = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=int(fed.min_train_nodes),
                  min_evaluate_nodes=0, min_available_nodes=int(fed.min_available_nodes),
                  weighted_by_key=weighted_by_key)
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
    if is_dp(strategy):
        return {"accountant": strategy.accountant.state_dict()}
    return {k: getattr(strategy, k) for k in STRATEGY_STATE if getattr(strategy, k, None) is not None}


def restore_strategy_state(strategy, state: dict) -> None:
    for k, v in state.items():
        if k == "accountant":
            strategy.accountant.load_state_dict(v)
        else:
            setattr(strategy, k, v)
