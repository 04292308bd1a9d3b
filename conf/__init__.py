"""Hydra's config folder, installed as the package ``gigaseg.conf`` (found as ``pkg://gigaseg.conf``)."""
