"""Prefect flows that orchestrate pipeline/ (the only package that imports prefect)."""
import os

# Before prefect is imported anywhere through this package: no analytics from temporary servers.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
