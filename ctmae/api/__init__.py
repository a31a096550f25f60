"""The Python API: the plain functions the CLI commands call, for notebooks, pipelines and scripts."""
