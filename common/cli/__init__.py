"""The ``newadj`` command: one subcommand per user verb.

Trailing ``key=value`` arguments are Hydra overrides of ``conf/config.yaml``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.reports.console import compact_table, console, err_console, shown


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra config overrides, e.g. train.epochs=5")


def cmd_validate_site(args) -> int:
    from common.config import load_config
    from common.data.validation import validate_site

    if not Path(args.site_dir).is_dir():
        raise FileNotFoundError(2, "no such site folder", args.site_dir)
    cfg = load_config(args.overrides)
    report = validate_site(Path(args.site_dir), phases=tuple(cfg.data.phases), deep=not args.quick,
                           val_fraction=float(cfg.data.val_fraction), genomic_features=list(cfg.data.genomic_features),
                           clinical_features=list(cfg.data.clinical_features), cache_dir=str(cfg.data.cache_dir))
    report.render(console)
    return 0 if report.ok else 1


def cmd_synth(args) -> int:
    from common.config import load_config, to_plain
    from common.synth import generate_cohort

    cfg = load_config(args.overrides)
    summary = generate_cohort(Path(args.out), seed=args.seed, scale=args.scale, cfg=to_plain(cfg.synth),
                              workers=args.workers)
    console.print(synth_table(summary, f"Synthetic cohort in {args.out} (seed {args.seed}, scale {args.scale})"))
    return 0


def synth_table(summary: dict, title: str):
    """One row per site of a synthetic cohort, at most 80 columns wide."""
    table = compact_table(title, [("site", "left"), ("role", "left"), ("pts", "right"), ("MRI", "right"),
                                  ("masks", "right"), ("slides", "right"), ("genes", "right"), ("labels", "right"),
                                  ("benefit", "right"), ("format", "left")])
    for name, i in summary["sites"].items():
        table.add_row(name, i["role"], str(i["n_patients"]), str(i["n_mri_complete"]), str(i["n_tumor_mask"]),
                      str(i["n_pathology"]), str(i["n_genomics"]), str(i["n_labeled"]), str(i["n_benefit"]),
                      i["mri_format"])
    return table


def _site_dirs(paths: list[str]) -> list[Path]:
    """Each argument is a site folder, or a cohort folder holding site folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "clinical.csv").exists() or (p / "site.toml").exists():
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and ((d / "clinical.csv").exists() or (d / "site.toml").exists()))
            if not subs:
                raise SystemExit(f"error: {p}: neither a site folder (no clinical.csv) nor a cohort of site folders")
            out.extend(subs)
        else:
            raise SystemExit(f"error: {p}: no such folder")
    return out


def cmd_preprocess(args) -> int:
    from common.config import load_config
    from common.preprocess.cache import preprocess_site
    from common.data.site import SiteDataError

    cfg = load_config(args.overrides)
    status = 0
    table = compact_table("Preprocessing", [(c, "left" if c == "site" else "right") for c in (
        "site", "pts", "MRI new", "cached", "slides new", "cached", "tiles", "tiles/s", "failed", "s")])
    for site_dir in _site_dirs(args.site_dir):
        try:
            res = preprocess_site(site_dir, cfg, workers=args.workers,
                                  cache_dir=Path(args.cache_dir) / site_dir.name if args.cache_dir else None,
                                  console=console, progress=not args.no_progress)
        except SiteDataError as exc:
            err_console.print(f"[red]{site_dir}: site data has errors; run `newadj validate-site {site_dir}`[/red]\n{exc}")
            status = 1
            continue
        m, p = res.mri, res.pathology
        table.add_row(site_dir.name, str(res.n_patients), str(m["built"]), str(m["cached"]), str(p["built"]),
                      str(p["cached"]), str(p["tiles"]), "-" if p["tiles_per_s"] is None else f"{p['tiles_per_s']:.0f}",
                      str(len(res.failures)), f"{res.seconds:.1f}")
        for f in res.failures:
            err_console.print(f"[red]error[/red] {site_dir.name}/{f['file']} ({f['patient_id']}, {f['modality']}): {f['error']}")
        if res.failures:
            status = 1
        if args.json:
            print(json.dumps({"site": str(site_dir), "cache": str(res.cache_dir), "mri": m, "pathology": p,
                              "failures": res.failures, "seconds": res.seconds}))
    console.print(table)
    return status


def cmd_baseline(args) -> int:
    from common.learn.baseline import run_baseline
    from common.config import load_config

    cfg = load_config(_with_features(args))
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    run_baseline(Path(args.data), Path(args.out), cfg, arms=arms, console=console)
    console.print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def _print_federation(metrics: dict, run_dir: Path) -> None:
    """The end of a run: the external center's metrics, bytes and privacy, where everything is."""
    from common.reports.console import render_external

    for t in render_external(metrics):
        console.print(t)
    comm = metrics.get("communication", {})
    console.print(f"model {comm.get('model_bytes_fp32', 0) / 1e6:.2f} MB (fp32); sent {comm.get('bytes_sent', 0) / 1e6:.1f} MB, "
                  f"received {comm.get('bytes_received', 0) / 1e6:.1f} MB in all; wall {metrics.get('wall_seconds', 0):.0f}s")
    console.print(privacy_line(metrics.get("privacy") or {}))
    if metrics.get("stopped_early"):
        console.print(f"[yellow]stopped early:[/yellow] {metrics['stopped_early']}")
    console.print(f"run directory: {shown(run_dir)}", soft_wrap=True)
    console.print(f"  per-round report: newadj report {shown(run_dir)}", soft_wrap=True)
    console.print(f"  Flower's and Ray's logs: {shown(run_dir / 'logs')}", soft_wrap=True)
    bm = metrics.get("best_model") or {}
    if bm.get("sha256"):
        # the evaluator checks the package against this hash, received from here, not from a file beside it
        console.print(f"best model: {shown(run_dir / bm.get('file', 'best_model.pt'))}", soft_wrap=True)
        console.print(f"  sha256 {bm['sha256']}", soft_wrap=True)


def privacy_line(privacy: dict) -> str:
    """One line on how the run protected the centers' updates."""
    parts = ["secure aggregation (SecAgg+): " + ("on" if privacy.get("secure_aggregation") else "off")]
    dp = privacy.get("differential_privacy")
    if dp:
        parts.append(f"differential privacy: epsilon {dp['epsilon']:.2f} at delta {dp['delta']:g} after "
                     f"{dp['releases']} rounds (noise multiplier {dp['noise_multiplier']:g}, clipping norm "
                     f"{dp['clipping_norm']:g}, {dp['accounting']} accountant, {dp['level']})")
    else:
        parts.append("differential privacy: off")
    return "privacy: " + "; ".join(parts)


def _federate(start, run_dir: Path) -> int:
    """Run a federation (``start()`` returns its metrics), print its tables; exit 1 if it failed."""
    from server.ops.simulation import RunFailed

    try:
        metrics = start()
    except RunFailed as exc:
        err_console.print(f"[red]federation failed:[/red] {exc}")
        events = Path(run_dir) / "events.jsonl"
        for line in (events.read_text().splitlines() if events.exists() else []):
            ev = json.loads(line)
            if ev.get("event") == "failed":
                err_console.print(f"the server said: {ev.get('text')}")
        return 1
    _print_federation(metrics, run_dir.resolve())
    return 0


def _resumable(run_dir: Path, command: str, given: list[str]) -> dict | None:
    """The run spec of RUN_DIR for ``--resume`` (None, after saying why, when it cannot be resumed as asked)."""
    from server.ops.simulation import RunFailed, read_run_spec

    try:
        saved = read_run_spec(run_dir, command)
    except RunFailed as exc:
        err_console.print(f"[red]{exc}[/red]")
        return None
    if given and given != saved["overrides"]:
        err_console.print("[red]--resume continues a run with its own overrides; do not pass new ones[/red]")
        return None
    return saved


def cmd_simulate(args) -> int:
    from server.ops.simulation import run_simulation

    if args.resume:
        run_dir = Path(args.resume)
        saved = _resumable(run_dir, "simulate", args.overrides)
        if saved is None:
            return 2
        data, out, overrides = Path(saved["cohort"]), run_dir, saved["overrides"]
    elif not (args.data and args.out):
        err_console.print("[red]simulate needs --data and --out (or --resume RUN_DIR)[/red]")
        return 2
    else:
        data, out, overrides = Path(args.data), Path(args.out), _with_features(args)
    return _federate(lambda: run_simulation(data, out, overrides, console=console, stream=not args.quiet,
                                            resume=bool(args.resume), verbose=args.verbose), out)


def cmd_demo(args) -> int:
    """Synthetic cohort, the schema step, preprocessing, a federation: one line per phase, one per round."""
    import time

    from common.config import feature_overrides, load_config, to_plain
    from common.synth import generate_cohort
    from server.schema import FEATURES_YAML
    from server.ops.simulation import RunFailed, run_simulation

    cfg = load_config(args.overrides)
    d = cfg.demo
    base = Path(str(d.dir))
    cohort = Path(args.data) if args.data else base / f"cohort-s{d.seed}-x{d.scale}"
    if not (cohort / "_cohort.json").exists() and not args.data:
        t0 = time.perf_counter()
        console.print(f"synthetic cohort: writing {cohort} ...")
        summary = generate_cohort(cohort, seed=int(d.seed), scale=float(d.scale), cfg=to_plain(cfg.synth),
                                  workers=int(d.workers), progress=False)
        console.print(f"synthetic cohort: {len(summary['sites'])} sites, {summary['n_patients']} patients in "
                      f"{time.perf_counter() - t0:.0f}s")
    else:
        console.print(f"cohort: {cohort} (already there)")
    run_dir = base / "runs" / time.strftime("%Y%m%d-%H%M%S")
    overrides = list(d.overrides) + list(args.overrides)   # what the run asks of the sites (allowed keys only)
    t0 = time.perf_counter()
    try:
        prop = run_simulation(cohort, run_dir / "schema", overrides, console=console, stream=False, mode="schema",
                              verbose=args.verbose)["proposal"]
    except RunFailed as exc:
        err_console.print(f"[red]schema step failed:[/red] {exc}")
        return 1
    console.print(f"schema: {len(prop['rule']['training_centers'])} training centers; {len(prop['genomic_features'])} "
                  f"genomic and {len(prop['clinical_features'])} clinical features, modalities "
                  f"{', '.join(prop['modalities'])} in {time.perf_counter() - t0:.0f}s")
    console.print(f"  feature file: {shown(run_dir / 'schema' / FEATURES_YAML)}", soft_wrap=True)
    overrides += feature_overrides(run_dir / "schema" / FEATURES_YAML)
    return _federate(lambda: run_simulation(cohort, run_dir, overrides, console=console, stream=not args.quiet,
                                            workers=int(d.workers), verbose=args.verbose), run_dir)


def cmd_provision(args) -> int:
    from server.ops.provision import cmd_provision as provision

    return provision(args.federation_file, args.out, args.only, args.force, public_keys=args.public_keys)


def cmd_site_start(args) -> int:
    from server.ops.deploy import site_start

    return site_start(args.kit, args.data, runtime_port=args.runtime_port, key=args.key)


def cmd_site_keygen(args) -> int:
    from client.keys import KeyError_, fingerprint, keygen, load_public_key

    try:
        priv, pub = keygen(Path(args.out), args.center, force=args.force)
    except (KeyError_, OSError) as exc:
        err_console.print(f"newadj site keygen: error: {describe_error(exc)}", markup=False)
        return 2
    print(f"private key: {priv} (owner-only; it never leaves this site)")
    print(f"public key:  {pub} ({fingerprint(load_public_key(pub))}) -> send this file to the coordinator")
    return 0


def cmd_server_start(args) -> int:
    from server.ops.deploy import server_start

    return server_start(args.kit, database=args.database)


def cmd_run(args) -> int:
    from server.ops.submit import submit_run

    overrides = _with_features(args)
    if args.resume:
        saved = _resumable(Path(args.out), "run", overrides)
        if saved is None:
            return 2
        overrides = saved["overrides"]
    return _federate(lambda: submit_run(Path(args.kit), Path(args.out), overrides, console=console,
                                        stream=not args.quiet, resume=args.resume, verbose=args.verbose),
                     Path(args.out))


def _with_features(args) -> list[str]:
    """The command's overrides, plus those of ``--features FILE`` (a ValueError names the file)."""
    from common.config import feature_overrides

    if not getattr(args, "features", None):
        return list(args.overrides)
    return list(args.overrides) + feature_overrides(args.features)


def cmd_schema(args) -> int:
    """Ask every center for its columns (names and counts), propose the federation's feature file."""
    from server.schema import FEATURES_YAML
    from server.ops.simulation import RunFailed, run_simulation

    if bool(args.data) == bool(args.kit):
        err_console.print("[red]schema needs exactly one of --data COHORT (simulation) or --kit KIT (deployment)[/red]")
        return 2
    out = Path(args.out)
    try:
        if args.data:
            result = run_simulation(Path(args.data), out, args.overrides, console=console, stream=False,
                                    mode="schema", verbose=args.verbose)
        else:
            from server.ops.submit import submit_run

            result = submit_run(Path(args.kit), out, args.overrides, console=console, stream=False,
                                mode="schema", verbose=args.verbose)
    except RunFailed as exc:
        err_console.print(f"[red]schema step failed:[/red] {exc}")
        return 1
    prop = result["proposal"]
    table = compact_table(f"Proposed schema ({len(result['answers'])} centers answered; kept: >= "
                          f"{prop['rule']['min_centers']} training centers and >= "
                          f"{prop['rule']['min_patient_fraction']:.0%} of {prop['rule']['training_patients']} "
                          f"training patients)", [("kind", "left"), ("feature", "left"), ("centers", "right"),
                                                  ("patients", "right"), ("kept", "left"), ("enters as", "left")])
    for kind, key, kept in (("modality", "modalities", prop["modalities"]),
                            ("genomic", "genomic", prop["genomic_features"]),
                            ("clinical", "clinical", prop["clinical_features"])):
        for name, cov in prop["coverage"][key].items():
            rule = prop["scaling"].get(name)
            how = "" if not rule else (("log1p, " if rule["log"] else "") + f"({rule['center']:.3g}, {rule['scale']:.3g})")
            table.add_row(kind, name, str(cov["centers"]), str(cov["patients"]), "yes" if name in kept else "no", how)
    console.print(table)
    for who, why in (result.get("failures") or {}).items():
        err_console.print(f"[yellow]{who} did not answer:[/yellow] {why}")
    console.print(f"feature file: {out.resolve() / FEATURES_YAML} (review it, then pass --features to simulate, run "
                  f"or baseline)", soft_wrap=True)
    return 0


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
    p.add_argument("--arms", default="pooled,unimodal,local", help="comma list of pooled, unimodal, local")
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

    p = sub.add_parser("site", help="site IT: make this center's key, start its SuperNode")
    ss = p.add_subparsers(dest="site_command", required=True)
    q = ss.add_parser("keygen", help="make this center's SuperNode key pair here; send only the .pub to the coordinator")
    q.add_argument("--center", required=True, help="this center's id, as in the federation file")
    q.add_argument("--out", required=True, help="folder for supernode.key (0600) and <center>.pub")
    q.add_argument("--force", action="store_true", help="replace an existing key (re-keying this center)")
    q.set_defaults(func=cmd_site_keygen)
    q = ss.add_parser("start", help="validate the site data, then run flower-supernode with TLS and the site's key")
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
    import signal

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


if __name__ == "__main__":
    sys.exit(main())
