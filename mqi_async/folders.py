"""Folders the service owns: created 0700, level by level; an existing folder is never changed."""

from __future__ import annotations

import os
from pathlib import Path


def make_private_dirs(path: Path) -> list[Path]:
    """Create `path` and its missing parents with mode 0700; returns the folders it created.

    A folder that already exists (the service's own, or `/var/lib`) keeps its mode and owner:
    only what this call creates is the service's to set.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        # mkdir's mode is filtered by the umask (which cannot add bits); chmod makes it exact
        os.chmod(directory, 0o700)
        created.append(directory)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return created
