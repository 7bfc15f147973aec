"""Writing files and folders atomically (a temporary name beside the target, then a rename), with the
permissions the user's umask gives, as any ordinary file the user creates.

`tempfile.mkdtemp` and `mkstemp` create 0700 folders and 0600 files on purpose (they are private
scratch space), and a rename keeps that mode: a results folder made that way would be unreadable to
colleagues sharing a directory even when the user's umask (say 022) allows it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir_beside(target: str | os.PathLike[str], tag: str = "partial") -> Path:
    """A new empty folder `.<name>.<tag>-XXXX` next to `target`, mode 0777 & ~umask, to be renamed onto it."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def replace_file(path: str | os.PathLike[str], text: str) -> None:
    """Rewrite the text file `path` atomically; the new file has mode 0666 & ~umask."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply_umask(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the umask's modes (folders 0777 & ~umask, files 0666 & ~umask).

    For trees written by libraries that pick their own modes (safetensors writes its files 0600), before
    the tree is renamed into place.
    """
    mask = current_umask()
    root = Path(root)
    for p in (root, *root.rglob("*")):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
