"""What a site tells the federation about its own data schema (``newadj schema``): names and counts only.

The answer to a schema QUERY lists, for the genomic and clinical columns of the site's
tables and for each imaging / genomic modality, how many patients have a value, and per
column the sums of x, x^2, log1p(x) and log1p(x)^2 over them (from which the federation
standardises the features).  A column that fewer patients than the site's floor
(``min_patients.benefit`` of its policy, the smallest number of patients it releases
anything about) have is sent with zeros, so it is never singled out; no value of any
patient is sent.
"""
from __future__ import annotations

import numpy as np

from common.federation.reply_schema import MOMENTS


def site_schema(site_dir, center_id: str, role: str | None, cfg, policy) -> dict:
    """The schema QUERY reply of the site at ``site_dir`` (its own config ``cfg``); reads no image."""
    from common.data.site import SiteData

    site = SiteData.open(site_dir, phases=tuple(cfg.data.phases), val_fraction=float(cfg.data.val_fraction),
                         strict=False, cache_dir=str(cfg.data.cache_dir))
    floor = int(policy.min_patients["benefit"])

    def floored(n: int) -> int:
        return int(n) if n >= floor else 0

    pts = site.patients
    mods = {"mri": sum(1 for p in pts if p.mri_complete()), "pathology": sum(1 for p in pts if p.slide),
            "genomics": sum(1 for p in pts if p.genomics and any(v is not None for v in p.genomics.values()))}
    info = {"role": role or site.role, "center-id": center_id, "n-patients": floored(len(pts)),
            "modality-names": list(mods), "modality-counts": [floored(n) for n in mods.values()]}
    for kind, columns, rows in (("genomic", site.genomic_columns, [p.genomics or {} for p in pts]),
                                ("clinical", site.clinical_columns, [p.clinical for p in pts])):
        stats = [_moments([r.get(c) for r in rows], floor) for c in columns]
        info[f"{kind}-columns"] = list(columns)
        info[f"{kind}-counts"] = [st[0] for st in stats]
        for j, m in enumerate(MOMENTS):
            info[f"{kind}-{m}"] = [st[1][j] for st in stats]
    return info


def _moments(values, floor: int) -> tuple[int, list[float]]:
    """(patients with a value, [sum, sum of squares, the same of log1p, all >= 0]); zeros below the floor."""
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) < floor or len(x) == 0:
        return 0, [0.0] * len(MOMENTS)
    lx = np.log1p(np.clip(x, 0.0, None))
    return len(x), [float(x.sum()), float((x * x).sum()), float(lx.sum()), float((lx * lx).sum()),
                    float(bool((x >= 0).all()))]
