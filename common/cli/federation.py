"""``newadj`` verbs of a federation: schema, simulate, demo, run, provision, site keygen / start, server start."""
from __future__ import annotations

from pathlib import Path

from common.reports.console import compact_table, console, err_console, shown  # noqa: F401


from common.cli.data import _with_features
from common.cli.errors import describe_error


def _print_federation(metrics: dict, run_dir: Path) -> None:
    """The end of a run: the external center's metrics, bytes and privacy, where everything is."""
    from common.reports.console import render_capacity, render_cox, render_external

    for t in (render_cox(metrics), render_capacity(metrics), *render_external(metrics)):
        if t is not None:
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
        from rich.markup import escape

        err_console.print(f"[red]federation failed:[/red] {escape(str(exc))}", highlight=False)
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
    if getattr(args, "loco", False):
        if args.resume:
            err_console.print("[red]--loco runs its folds afresh; --resume continues one fold's RUN_DIR[/red]")
            return 2
        return _simulate_loco(data, out, overrides, args)
    return _federate(lambda: run_simulation(data, out, overrides, console=console, stream=not args.quiet,
                                            resume=bool(args.resume), verbose=args.verbose), out)


def _simulate_loco(data: Path, out: Path, overrides: list[str], args) -> int:
    """Leave-one-center-out CV of the federation (:func:`server.ops.simulation.run_loco`): ``OUT/<center>/``
    holds each fold's run, ``OUT/loco.json`` the folds and their mean and SD."""
    from common.learn.baseline import loco_table
    from server.ops.simulation import RunFailed, run_loco

    try:
        loco = run_loco(data, out, overrides, console=console, stream=not args.quiet, verbose=args.verbose,
                        on_failure=lambda c, exc: err_console.print(f"[red]fold {c} failed:[/red] {exc}"))
    except RunFailed as exc:   # too few training centers: no fold ran
        err_console.print(f"[red]{exc}[/red]")
        return 2
    console.print(loco_table(loco, "Federated leave-one-center-out CV (the external center sealed)"))
    console.print(f"folds: {shown(out)}; summary: {shown(out / 'loco.json')}", soft_wrap=True)
    return 1 if loco["failed"] else 0


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
        # each synthetic site's own settings, as its IT would write them (never the run's): a larger validation
        # split, so that the small demo centers reach the default disclosure floors
        for site in sorted(p for p in cohort.iterdir() if (p / "site.toml").exists()):
            with (site / "policy.toml").open("a") as f:
                f.write(f"# demo site: a larger validation split\n[config]\ndata.val_fraction = {float(d.val_fraction)}\n")
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
    overrides = feature_overrides(run_dir / "schema" / FEATURES_YAML) + overrides   # the command line wins
    return _federate(lambda: run_simulation(cohort, run_dir, overrides, console=console, stream=not args.quiet,
                                            workers=int(d.workers), verbose=args.verbose), run_dir)


def cmd_provision(args) -> int:
    from server.ops.provision import cmd_provision as provision

    return provision(args.federation_file, args.out, args.only, args.force, public_keys=args.public_keys)


def cmd_site_start(args) -> int:
    from server.ops.deploy import site_start

    return site_start(args.kit, args.data, runtime_port=args.runtime_port, key=args.key)


def cmd_bundle(args) -> int:
    """The app bundle `newadj run` submits (the installed code), written for the sites to review."""
    from client.bundles import read_bundle
    from server.ops.processes import write_bundle

    path, digest = write_bundle(Path(args.out))
    b = read_bundle(path.read_bytes())
    print(f"bundle: {path} ({b.fab_id} {b.version}, {len(b.files)} files)")
    print(f"sha256 {digest}")
    print("send it to every site; each reviews it and runs `newadj site approve --site SITE_DIR BUNDLE`")
    return 0


def cmd_site_approve(args) -> int:
    """Review a bundle (identity, files that differ from the installed code) and approve it in policy.toml."""
    from client.bundles import BundleError, approve, installed_differences
    from common.data.policy import PolicyError

    try:
        bundle, new = approve(Path(args.site), Path(args.bundle))
    except (BundleError, PolicyError) as exc:
        err_console.print(f"newadj site approve: {describe_error(exc)}", markup=False)
        return 2
    differ, extra = installed_differences(Path(args.bundle).read_bytes())
    print(f"{bundle.fab_id} {bundle.version}, sha256 {bundle.sha256}: "
          + ("approved in " if new else "already approved in ") + str(Path(args.site) / "policy.toml"))
    if differ or extra:
        print(f"note: {len(differ) + len(extra)} file(s) of the bundle are not the code installed here (this site "
              "runs its installed code either way): " + ", ".join([*differ, *extra][:20]))
    else:
        print("its files are the code installed at this site")
    return 0


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
    from rich.markup import escape

    for flag in prop.get("flags") or []:      # advice for the review: the feature stays in the proposal
        console.print(f"[yellow]flag:[/yellow] {escape(flag['message'])}", soft_wrap=True, highlight=False)
    console.print(f"feature file: {out.resolve() / FEATURES_YAML} (review it, then pass --features to simulate, run "
                  f"or baseline)", soft_wrap=True)
    return 0
