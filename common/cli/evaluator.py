"""The evaluator's subcommands: ``evaluate``, ``report``, ``screen``.

``register(subparsers)`` adds them to the ``newadj`` parser (``common/cli.py``).
Handlers return exit codes: 0 success, 2 bad input (the message names the file
or patient), 1 any other failure.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.reports.console import console, err_console


def _fail(exc: Exception, command: str = "") -> int:
    from common.reports.evaluate import EvaluationError

    err_console.print(f"newadj {command}: error: {exc}".replace("newadj : ", "newadj: "), markup=False)
    return 2 if isinstance(exc, EvaluationError) else 1


SHA_HELP = ("SHA-256 of the model package as the coordinator announced it by another channel (the run's final "
            "log line `best model: ... sha256 ...`, or best_model.sha256 in the run's metrics.json); the package "
            "is refused unless it matches. The .json beside a package is not trusted.")


def _expected_sha(args) -> str | None:
    """The --sha256 the user gave; None only with --no-verify (own files, e.g. the coordinator's run)."""
    if args.sha256:
        return args.sha256
    if args.no_verify:
        return None
    raise SystemExit("error: give --sha256 HASH (the model's SHA-256 from the coordinator's final log or "
                     "metrics.json); a package whose hash you did not get by another channel is not loaded")


def cmd_evaluate(args) -> int:
    from common.reports.evaluate import EvaluationError, evaluate_site

    splits = [s.strip() for s in args.split.split(",")] if args.split else None
    try:
        m = evaluate_site(Path(args.model), Path(args.site), Path(args.out), splits=splits, n_boot=args.n_boot,
                          seed=args.seed, expected_sha256=_expected_sha(args))
    except EvaluationError as exc:
        return _fail(exc, "evaluate")
    def show(e):
        if not isinstance(e, dict) or e.get("value") is None:
            return None
        return f"{e['value']:.3f} ({e['lo']:.3f}-{e['hi']:.3f})"

    s = m["survival"]
    parts = [("AUC", m["discrimination"]["auc"]), ("accuracy", m["discrimination"]["accuracy"]),
             ("C-index", s["c_index"]), *((f"DFS AUC at {h} mo", v) for h, v in (s.get("td_auc") or {}).items()
                                          if isinstance(v, dict)), ("integrated Brier", s.get("ibs"))]
    shown = [f"{name} {show(e)}" for name, e in parts if show(e)]
    console.print(f"{m['site']['center_id']}: {m['n_patients']} patients (model trained for "
                  f"{', '.join(m['endpoints'])}); " + ("; ".join(shown) or "no metric computable"), highlight=False)
    console.print(f"report: {Path(args.out) / 'report.html'}\nmetrics: {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_report(args) -> int:
    from common.reports.evaluate import EvaluationError
    from common.reports.run_report import run_report

    try:
        out = run_report(Path(args.run_dir), Path(args.baseline) if args.baseline else None,
                         Path(args.cohort) if args.cohort else None)
    except EvaluationError as exc:
        return _fail(exc, "report")
    console.print(f"report: {out}")
    return 0


def cmd_screen(args) -> int:
    from common.reports.evaluate import EvaluationError
    from common.reports.screening import format_screening, screen_all, screen_patient

    if bool(args.patient) == bool(args.all):
        err_console.print("newadj screen: error: give exactly one of --patient ID or --all")
        return 2
    try:
        if args.all:
            out = screen_all(Path(args.model), Path(args.site), Path(args.out) if args.out else None,
                             passes=args.passes, seed=args.seed, expected_sha256=_expected_sha(args))
            console.print(f"screening of every patient written to {out} (keep it at the site)")
        else:
            r = screen_patient(Path(args.model), Path(args.site), args.patient, passes=args.passes, seed=args.seed,
                               expected_sha256=_expected_sha(args))
            if args.json:
                print(json.dumps(r, indent=1, default=str))
            else:
                print(format_screening(r))
    except EvaluationError as exc:
        return _fail(exc, "screen")
    return 0


def _verify_args(p) -> None:
    p.add_argument("--sha256", default=None, help=SHA_HELP)
    p.add_argument("--no-verify", action="store_true",
                   help="load without a hash (only for a package you made yourself); it is still never executed")


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="external validation of a model package on one site (run at the site)")
    p.add_argument("--model", required=True, help="model package (best_model.pt or a baseline models/*.pt)")
    p.add_argument("--site", required=True, help="site data folder")
    p.add_argument("--out", required=True, help="report folder (report.html, metrics.json)")
    p.add_argument("--split", default=None, help="comma list of splits to evaluate (default: every patient)")
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default: the model's train.n_boot)")
    p.add_argument("--seed", type=int, default=0)
    _verify_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("report", help="one HTML page about a finished federation run")
    p.add_argument("run_dir")
    p.add_argument("--baseline", default=None, help="`newadj baseline --out` directory (pooled / local-only arms)")
    p.add_argument("--cohort", default=None, help="cohort folder for the cross-site matrix (default: the run's)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("screen", help="trial screening: predicted benefit (criterion 8) and protocol checks")
    p.add_argument("--model", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--patient", default=None, help="patient_id to screen")
    p.add_argument("--all", action="store_true", help="screen every patient of the site into a CSV")
    p.add_argument("--out", default=None, help="CSV path for --all (default <SITE>/.newadj-screening.csv)")
    p.add_argument("--passes", type=int, default=50, help="MC-dropout forward passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _verify_args(p)
    p.set_defaults(func=cmd_screen)
