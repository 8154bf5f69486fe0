"""Learning from one site's cache: the dataset, New-adj-Net, its losses, the one training engine (used by
baselines and federated clients alike), and the non-federated reference arms (``baseline``)."""
