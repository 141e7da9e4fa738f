"""Thin entrypoints that the Ray Jobs API runs (``ray job submit -- python -m ray_jobs.<name>``)."""
