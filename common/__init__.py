"""What every participant runs: the data path, one stage per sub-package, read top-down.

* ``data``       -- the contract, the one reader of a site folder, its identity, splits, policy, validation
* ``preprocess`` -- MRI (MONAI), pathology (tiles and encoders), tabular features, the site's cache
* ``learn``      -- dataset, model, losses, the one training engine, the reference baselines
* ``metrics``    -- classification, calibration, survival, bootstrap, pooling what sites release
* ``federation`` -- what crosses the wire: the reply schema, weight records, model packages
* ``reports``    -- evaluate, screen, the run report, HTML, plots, console tables
* ``synth``      -- the synthetic multi-center cohort, by modality
* ``cli``        -- the ``newadj`` command
* ``config``, ``hashing`` -- configuration (``conf/``) and content hashes, used by every stage
"""
