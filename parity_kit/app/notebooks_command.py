"""``parity-kit notebooks DEST``: copy the story notebooks out of the installed package into a folder of your own.

The notebooks read everything else (built-in models, tokenizer, eval set, prompts, stored GPU figures) through
the package (:func:`parity_kit._util.paths.data_dir`), so the copies open and run in JupyterLab anywhere the
package is installed; their ``reports_dir`` (``"reports"``) is a folder next to them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .._util.atomic import atomic_path
from .._util.paths import notebooks_dir
from ..errors import ParityKitError


def copy_notebooks(dest: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Copy the shipped notebooks (``00_quickstart.ipynb`` … ``05_bug_report.ipynb``) into ``dest``.

    ``dest`` is created when missing. A notebook already in ``dest`` is kept (it may hold your edits) and the
    copy refused, naming it, unless ``overwrite`` is true. Each file is written atomically.

    >>> import tempfile
    >>> copied = copy_notebooks(Path(tempfile.mkdtemp()) / "nb")
    >>> [p.name for p in copied][:2]
    ['00_quickstart.ipynb', '01_fp16_fp32_divergence.ipynb']
    """
    target = Path(dest)
    if target.exists() and not target.is_dir():
        raise ParityKitError(f"{target} exists and is not a folder; pass a folder to copy the notebooks into")
    sources = sorted(notebooks_dir().glob("[0-9]*.ipynb"))
    if not sources:
        raise ParityKitError(f"no notebooks in {notebooks_dir()}; the installation is incomplete, reinstall parity_kit")
    present = [src.name for src in sources if (target / src.name).exists()]
    if present and not overwrite:
        raise ParityKitError(f"{target} already holds {', '.join(present)}; keep your edits and copy into another "
                             "folder, or pass --overwrite to replace them")
    copied = []
    for src in sources:
        with atomic_path(target / src.name) as tmp:
            shutil.copyfile(src, tmp)
        copied.append(target / src.name)
    return copied
