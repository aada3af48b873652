"""Prefect flows that orchestrate pipeline/ (the only package that imports prefect)."""
import os

from spectr.registry.settings import spectr_home

# Before prefect is imported anywhere through this package: no analytics from temporary servers, and
# Prefect's own home (its database, profiles) under SPECTR_HOME unless the user chose another.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(spectr_home() / "prefect"))
