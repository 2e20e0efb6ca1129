"""The package's version: one function serves ``sharedstate.__version__`` and ``sharedstate --version``."""

from __future__ import annotations

import importlib.metadata

#: The version of this source. The build copies it into the package's metadata (pyproject.toml,
#: ``[tool.setuptools.dynamic]``); ``version()`` returns it only where there is no metadata: a source tree
#: imported without being installed (``PYTHONPATH=.``).
SOURCE_VERSION = "0.1.0"


def version() -> str:
    """The installed distribution's version, as pip and ``importlib.metadata`` report it, or
    ``SOURCE_VERSION`` when the package is not installed."""
    try:
        return importlib.metadata.version("sharedstate")
    except importlib.metadata.PackageNotFoundError:
        return SOURCE_VERSION
