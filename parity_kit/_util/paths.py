"""Where the package's data and notebooks live: inside the package (``parity_kit/data/``,
``parity_kit/notebooks/``), read with :mod:`importlib.resources`, so a clone, an editable install and a wheel
installed anywhere find the same files. ``PARITY_KIT_DATA`` points the data somewhere else."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from ..errors import ParityKitError


def repo_root() -> Path:
    """The folder that holds the ``parity_kit/`` package: a clone's root, or ``site-packages`` once installed.

    >>> (repo_root() / "parity_kit").is_dir()
    True
    """
    return Path(__file__).resolve().parents[2]


def package_folder(name: str) -> Path:
    """A folder shipped inside the package (``"data"`` or ``"notebooks"``) as a real path on disk.

    >>> package_folder("notebooks").name
    'notebooks'
    """
    resource = importlib.resources.files("parity_kit") / name
    folder = Path(str(resource))
    if not folder.is_dir():
        raise ParityKitError(
            f"parity_kit/{name}/ is not a folder on disk ({resource}); install parity_kit from a wheel or a clone "
            "(pip install parity_kit), not as a zip, or set PARITY_KIT_DATA to a copy of the data folder"
        )
    return folder


def data_dir() -> Path:
    """The data folder (built-in models, tokenizer, eval sets, prompts): ``parity_kit/data/`` inside the
    installed package; the environment variable ``PARITY_KIT_DATA`` overrides it.

    >>> (data_dir() / "models").is_dir()
    True
    """
    override = os.environ.get("PARITY_KIT_DATA")
    return Path(override) if override else package_folder("data")


def notebooks_dir() -> Path:
    """The story notebooks shipped with the package (``parity_kit/notebooks/``); ``parity-kit notebooks DEST``
    copies them to a folder of your own.

    >>> sorted(p.name for p in notebooks_dir().glob("0*.ipynb"))[0]
    '00_quickstart.ipynb'
    """
    return package_folder("notebooks")
