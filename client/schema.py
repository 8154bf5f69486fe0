"""What a site tells the federation about its own data schema (``newadj schema``): names and counts only.

The answer to a schema QUERY lists, for the genomic and clinical columns of the site's
tables and for each imaging / genomic modality, how many patients have a value.  A
count below the site's floor (``min_patients.benefit`` of its policy, the smallest
number of patients it releases anything about) is sent as 0, so a column that only a
handful of patients have is never singled out; no value of any patient is sent.
"""
from __future__ import annotations


def site_schema(site_dir, center_id: str, role: str | None, cfg, policy) -> dict:
    """The schema QUERY reply of the site at ``site_dir`` (its own config ``cfg``); reads no image."""
    from common.site_data import SiteData

    site = SiteData.open(site_dir, phases=tuple(cfg.data.phases), val_fraction=float(cfg.data.val_fraction),
                         strict=False, cache_dir=str(cfg.data.cache_dir))
    floor = int(policy.min_patients["benefit"])

    def floored(n: int) -> int:
        return int(n) if n >= floor else 0

    pts = site.patients
    gen = [floored(sum(1 for p in pts if p.genomics and p.genomics.get(c) is not None)) for c in site.genomic_columns]
    clin = [floored(sum(1 for p in pts if p.clinical.get(c) is not None)) for c in site.clinical_columns]
    mods = {"mri": sum(1 for p in pts if p.mri_complete()), "pathology": sum(1 for p in pts if p.slide),
            "genomics": sum(1 for p in pts if p.genomics and any(v is not None for v in p.genomics.values()))}
    info = {"role": role or site.role, "center-id": center_id, "n-patients": floored(len(pts)),
            "genomic-columns": list(site.genomic_columns), "genomic-counts": gen,
            "clinical-columns": list(site.clinical_columns), "clinical-counts": clin,
            "modality-names": list(mods), "modality-counts": [floored(n) for n in mods.values()]}
    return info
