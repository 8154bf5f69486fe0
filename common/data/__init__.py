"""A site's data folder, read once and the same way everywhere (``shared/data-contract.md``).

``contract`` (names, problems), ``tables`` (CSV), ``identity`` (``site.toml``), ``images``
(MRI through MONAI's readers, slides through tiffslide), ``splits`` (the validation split),
``site`` (``SiteData``: the one reader), ``validation`` (``newadj validate-site``),
``cohort`` (a folder of site folders), ``policy`` (the site's ``policy.toml`` and settings).
A new slide or image format starts in ``images``.
"""
