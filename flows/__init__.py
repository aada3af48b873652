"""Prefect flows that orchestrate pipeline/ (the only package that imports prefect)."""
