"""``newadj`` verbs on one site or a cohort: validate-site, synth, preprocess, baseline."""
from __future__ import annotations

import json
from pathlib import Path

from common.reports.console import compact_table, console, err_console, shown  # noqa: F401


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
    sig = summary.get("signal") or {}
    if any(sig.get(k) != v for k, v in (("mri", "enhancement"), ("pathology", "lymphocytes"), ("genomics", "immune"))):
        console.print("signal: " + ", ".join(f"{k} {v}" for k, v in sig.items()))
    if summary.get("shift"):
        console.print("shifted center: " + ", ".join(f"{k} {v}" for k, v in summary["shift"].items()))
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

    # `site_dir` takes one or more arguments, so argparse hands it the overrides that follow the folders
    # (`newadj preprocess runs/full key=value`): a KEY=VALUE that is not a folder is an override
    is_override = {a: "=" in a and not Path(a).exists() for a in args.site_dir}
    overrides = [a for a in args.site_dir if is_override[a]] + list(args.overrides)
    site_args = [a for a in args.site_dir if not is_override[a]]
    if not site_args:
        raise SystemExit("error: no site folder given")
    cfg = load_config(overrides)
    status = 0
    table = preprocess_table()
    for site_dir in _site_dirs(site_args):
        try:
            res = preprocess_site(site_dir, cfg, workers=args.workers,
                                  cache_dir=Path(args.cache_dir) / site_dir.name if args.cache_dir else None,
                                  console=console, progress=not args.no_progress)
        except SiteDataError as exc:
            err_console.print(f"[red]{site_dir}: site data has errors; run `newadj validate-site {site_dir}`[/red]\n{exc}")
            status = 1
            continue
        m, p = res.mri, res.pathology
        add_preprocess_row(table, site_dir.name, res)
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


def _with_features(args) -> list[str]:
    """The overrides of ``--features FILE`` (a ValueError names the file), then the command's own: a key set on the
    command line wins over the feature file (e.g. ``model.modalities=[pathology]`` for a one-branch run)."""
    from common.config import feature_overrides

    if not getattr(args, "features", None):
        return list(args.overrides)
    return feature_overrides(args.features) + list(args.overrides)


def preprocess_table():
    """One row per site (fits 80 columns): MRI volumes and slides as built/cached."""
    t = compact_table("Preprocessing", [("site", "left"), ("pts", "right"), ("MRI", "right"), ("slides", "right"),
                                        ("tiles", "right"), ("tiles/s", "right"), ("failed", "right"), ("s", "right")])
    t.caption, t.caption_justify = "MRI and slides: built now / found in the cache", "left"
    return t


def add_preprocess_row(table, name: str, res) -> None:
    m, p = res.mri, res.pathology
    table.add_row(name, str(res.n_patients), f"{m['built']}/{m['cached']}", f"{p['built']}/{p['cached']}",
                  str(p["tiles"]), "-" if p["tiles_per_s"] is None else f"{p['tiles_per_s']:.0f}",
                  str(len(res.failures)), f"{res.seconds:.1f}")
