"""Command-line entry points: the only code that sees Hydra configs or starts MLflow runs."""
