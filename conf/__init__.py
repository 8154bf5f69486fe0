"""The project's configuration, installed with the code: Hydra YAML files (``config.yaml`` and one
folder per group), the default site policy (``policy/default.yaml``) and the Flower app description
(``flwr_app.toml``). ``common.config.CONF_DIR`` is this folder."""
