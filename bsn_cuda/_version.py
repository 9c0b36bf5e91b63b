"""The package version, in one place: bsn_cuda/__init__.py imports it and
pyproject.toml reads it (``[tool.setuptools.dynamic]``) without importing
bsn_cuda, which needs torch."""

__version__ = "0.1.0"
