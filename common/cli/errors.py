"""What the CLI does with a failure: which are the input's fault (exit 2) and how to say it in one line."""
from __future__ import annotations


def expected_error(exc: BaseException) -> bool:
    """Failures of the input (files, tables, configs, overrides, site data, policies, packages, kits)."""
    import tomllib

    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from common.reports.evaluate import EvaluationError
    from common.data.site import SiteDataError
    from common.data.policy import PolicyError
    from server.ops.deploy import KitError
    from server.ops.simulation import RunFailed

    return isinstance(exc, (OSError, tomllib.TOMLDecodeError, yaml.YAMLError, HydraException, OmegaConfBaseException,
                            SiteDataError, PolicyError, EvaluationError, KitError, RunFailed, ValueError, KeyError))


def describe_error(exc: BaseException) -> str:
    """One line: what went wrong and with which file, key or override."""
    import tomllib

    from hydra.errors import HydraException

    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"malformed TOML: {exc}"
    if isinstance(exc, HydraException):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"bad configuration override: {first}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."
