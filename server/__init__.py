"""The coordinating server: the ServerApp (``server_app``) and its parts -- roles, rounds (plain and
SecAgg+), evaluation and selection, checkpoints, strategies, update checks, the schema step, progress
events -- and the operator tooling in ``ops``."""
