"""Safe file writes: atomic (a killed process never leaves a half-written file under its real
name) and confined (a name from a manifest or the command line cannot leave its folder)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from pipeline.core.errors import InputError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    Args:
        path: destination; parent folders are created.
        write: writes the complete content to the path it is given.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def safe_child(root: str | Path, name: str | Path) -> Path:
    """``root / name``, refused if it would land outside ``root``.

    Use it for every file name built from values a user or a file supplies (manifest
    columns, CLI options, subject ids), before writing.

    Args:
        root: the output folder (need not exist yet).
        name: a relative path below ``root``; sub-folders are allowed (``"z_05/s001.png"``).

    Returns:
        ``Path(root) / name`` (not resolved, so messages show it as given).

    Raises:
        ValueError: ``name`` is empty, absolute, contains a NUL byte, names ``root`` itself,
            or leads outside ``root`` through ``..`` or a symlink.
    """
    text = str(name)
    if not text or "\0" in text or PurePath(text).is_absolute():
        raise InputError(f"file name {text!r} must be a non-empty relative path below {root}")
    path = Path(root) / text
    base = Path(root).resolve()
    target = path.resolve()
    if target == base or not target.is_relative_to(base):
        raise InputError(f"file name {text!r} leads outside the output folder {root}; refused")
    return path
