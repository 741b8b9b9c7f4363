"""Where the repository's data lives."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The folder that holds ``parity_kit/``, ``data/`` and ``notebooks/``.

    >>> (repo_root() / "parity_kit").is_dir()
    True
    """
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The ``data/`` folder (built-in models, eval sets, prompts); ``PARITY_KIT_DATA`` overrides it.

    >>> data_dir().name
    'data'
    """
    override = os.environ.get("PARITY_KIT_DATA")
    return Path(override) if override else repo_root() / "data"
