"""What runs at a site: the ClientApp (``client_app``), the site's runtime (its data, once per process), the
policy mod and disclosure rules that decide what leaves the site, the audit log, the schema answer, the
SuperNode key, and the SecAgg+ / DP / fault-injection mods."""
