"""The ``newadj`` command: one subcommand per user verb.

Trailing ``key=value`` arguments are Hydra overrides of ``conf/config.yaml``.
"""
from __future__ import annotations

import argparse

from common.cli.data import cmd_baseline, cmd_preprocess, cmd_synth, cmd_validate_site, synth_table  # noqa: F401
from common.cli.errors import describe_error, expected_error
from common.cli.federation import (cmd_bundle, cmd_demo, cmd_provision, cmd_run, cmd_schema, cmd_server_start,
                                   cmd_simulate, cmd_site_approve, cmd_site_keygen, cmd_site_start)
from common.reports.console import err_console


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra config overrides, e.g. train.epochs=5")


def _run_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="print only the end of the run (no line per round)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Flower's and Ray's own output live (always kept in RUN_DIR/logs/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="newadj", description="Federated New-adj-Net for BCLC-B HCC")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    after = argparse.ArgumentParser(add_help=False)   # `newadj CMD ... --debug` too (absent: keeps the above)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(*a, **k):
        return _add(*a, parents=[after], **k)

    sub.add_parser = add_parser

    p = sub.add_parser("validate-site", help="check one site's data folder against the data contract (read-only)")
    p.add_argument("site_dir")
    p.add_argument("--quick", action="store_true", help="check tables and file names only, do not decode images")
    _add_overrides(p)
    p.set_defaults(func=cmd_validate_site)

    p = sub.add_parser("synth", help="write a synthetic multi-center cohort in the contract's layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every site's size (e.g. 0.1 for tests)")
    p.add_argument("--workers", type=int, default=1)
    _add_overrides(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("preprocess", help="build a site's local cache (MRI volumes, slide feature bags, tabular features)")
    p.add_argument("site_dir", nargs="+", help="site folder(s), or a cohort folder of site folders")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: preprocess.workers)")
    p.add_argument("--cache-dir", default=None, help="write caches under this folder instead of <site>/.newadj-cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="also print one JSON line of statistics per site")
    _add_overrides(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("baseline", help="pooled, local-only and unimodal reference arms, scored on the external center")
    p.add_argument("--data", required=True, help="cohort folder (one site folder per center)")
    p.add_argument("--out", required=True, help="run directory (metrics.json, config.yaml)")
    p.add_argument("--arms", default="pooled,unimodal,local",
                   help="comma list of pooled, unimodal, local, loco (leave-one-center-out CV over the training centers), "
                        "loco-local (each center's local-only model scored on every other training center)")
    p.add_argument("--features", default=None, metavar="FILE", help="feature file from `newadj schema`")
    _add_overrides(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("schema", help="ask every center which columns it has (names and counts) and propose the "
                                      "federation's feature file")
    p.add_argument("--data", default=None, help="cohort folder (simulation)")
    p.add_argument("--kit", default=None, help="the coordinator's kit (deployment, after `newadj server start`)")
    p.add_argument("--out", required=True, help="folder for schema.json and features.yaml")
    _run_output(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("simulate", help="run the federation as a Flower simulation on a cohort folder")
    p.add_argument("--features", default=None, metavar="FILE", help="feature file from `newadj schema`")
    p.add_argument("--data", help="cohort folder (one site folder per center)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its last checkpoint (same cohort and overrides)")
    p.add_argument("--loco", action="store_true",
                   help="leave-one-center-out CV: one run per training center held out (the external center "
                        "sealed); OUT/<center>/ per fold, OUT/loco.json")
    _run_output(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="the main job: synthetic cohort, preprocessing and a federation, no arguments needed")
    p.add_argument("--data", default=None, help="use this cohort instead of generating one")
    _run_output(p)
    _add_overrides(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("provision", help="coordinating center: CA, SuperLink TLS certificate, one startup kit per center")
    p.add_argument("federation_file", help="federation file (see conf/federation_kit/demo.yaml)")
    p.add_argument("--out", required=True, help="kits folder")
    p.add_argument("--only", action="append", default=None, metavar="CENTER",
                   help="re-provision only this center (repeatable); the CA and other centers stay as they are")
    p.add_argument("--force", action="store_true", help="replace an existing CA (invalidates every kit)")
    p.add_argument("--public-keys", default=None, metavar="DIR",
                   help="folder of the public keys the sites sent, DIR/<center_id>.pub (or `public_key:` per center "
                        "in the federation file)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("bundle", help="coordinating center: write the app bundle that `newadj run` submits, for the "
                                      "sites to review and approve")
    p.add_argument("--out", required=True, help="a .fab file, or a folder for Flower's file name")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("site", help="site IT: make this center's key, approve a bundle, start the site")
    ss = p.add_subparsers(dest="site_command", required=True)
    q = ss.add_parser("keygen", help="make this center's SuperNode key pair here; send only the .pub to the coordinator")
    q.add_argument("--center", required=True, help="this center's id, as in the federation file")
    q.add_argument("--out", required=True, help="folder for supernode.key (0600) and <center>.pub")
    q.add_argument("--force", action="store_true", help="replace an existing key (re-keying this center)")
    q.set_defaults(func=cmd_site_keygen)
    q = ss.add_parser("approve", help="review an app bundle and add its SHA-256 to policy.toml's approved_bundles")
    q.add_argument("--site", required=True, help="the site folder (its policy.toml)")
    q.add_argument("bundle", help="the .fab file the coordinator sent (`newadj bundle`)")
    q.set_defaults(func=cmd_site_approve)
    q = ss.add_parser("start", help="validate the site data, then run the site: flower-supernode (TLS, the site's "
                                    "key, process isolation) and the site's warm runtime of the installed ClientApp")
    q.add_argument("--kit", required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--key", default=None,
                   help="this site's private key from `newadj site keygen` (default: KIT/supernode.key)")
    q.add_argument("--runtime-port", type=int, default=None,
                   help="local port of this SuperNode's Runtime API (default: the kit's runtime_port)")
    q.set_defaults(func=cmd_site_start)

    p = sub.add_parser("server", help="coordinating center: start the SuperLink")
    ss = p.add_subparsers(dest="server_command", required=True)
    q = ss.add_parser("start", help="run flower-superlink with TLS and SuperNode authentication, centers' keys registered")
    q.add_argument("--kit", required=True)
    q.add_argument("--database", default=None,
                   help="SuperLink state (default: KIT/state/state.db, kept across restarts); "
                        "':flwr-in-memory:' avoids SQLite lock errors on an overloaded host")
    q.set_defaults(func=cmd_server_start)

    p = sub.add_parser("run", help="coordinating center: submit the federation to the running SuperLink and follow it")
    p.add_argument("--kit", required=True, help="the coordinator's kit (after `newadj server start --kit KIT`)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, history, metrics.json)")
    p.add_argument("--features", default=None, metavar="FILE", help="feature file from `newadj schema`")
    _run_output(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (after the server died)")
    _add_overrides(p)
    p.set_defaults(func=cmd_run)

    from common.cli.evaluator import register  # the evaluator's verbs: evaluate, report, screen

    register(sub)
    return parser


def _terminate(signum, frame):  # SIGTERM runs the same clean-up as Ctrl-C (stop every process we started)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; an expected failure is one line on stderr naming the file or key (exit 2), never a
    traceback unless ``--debug``."""
    import os
    import signal

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"    # every Flower process this command starts inherits it
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:             # a command that stopped with a message of its own
        if isinstance(exc.code, str):
            if args.debug:
                raise
            err_console.print(f"newadj {args.command}: {exc.code.removeprefix('error: ')}", markup=False)
            return 2
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one readable line
        if args.debug:
            raise
        msg = describe_error(exc)
        err_console.print(f"newadj {args.command}: error: {msg}", markup=False)
        if not expected_error(exc):
            err_console.print(f"(unexpected {type(exc).__name__}; run `newadj --debug {args.command} ...` for the "
                              f"traceback)", markup=False)
            return 1
        return 2
