"""What people read: ``evaluate`` (external validation at a site) and its page, ``screening`` (trial
screening), ``run_report`` (a federation run), ``html`` and ``plots`` (page parts), ``console`` (the
CLI's lines and tables)."""
