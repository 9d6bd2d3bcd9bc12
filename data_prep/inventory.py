"""Every file found, accounted for: used, skipped (with the reason) or ignored (with the reason).

``prepare_report.json`` carries the counts (``found = used + skipped + ignored``), the
skipped files one by one and the ignored files grouped by reason, so no input goes
unused without a word. The two files of an Analyze/NIfTI pair share a fate: a header is
used, skipped or ignored with its data file unless a reader said otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.files import READABLE, file_kind, partner
from data_prep.readers.base import Skip


@dataclass
class Inventory:
    """The fate of every file found.

    Attributes:
        found: every file found (relative paths).
        used: files that fed a split.
        skipped: file → reason, for files left out because of a problem with them.
        ignored: file → reason, for files that are not input of the layout read.
    """

    found: tuple[str, ...]
    used: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def has(self, file: str) -> bool:
        """True once ``file`` has a fate."""
        return file in self.used or file in self.skipped or file in self.ignored

    def counts(self) -> dict[str, int]:
        """``{"found", "used", "skipped", "ignored"}``; found = used + skipped + ignored."""
        return {
            "found": len(self.found),
            "used": len(self.used),
            "skipped": len(self.skipped),
            "ignored": len(self.ignored),
        }

    def ignored_groups(self) -> list[dict[str, Any]]:
        """The ignored files grouped by reason: ``[{"reason", "count", "files"}]``, largest
        group first."""
        groups: dict[str, list[str]] = defaultdict(list)
        for file, reason in sorted(self.ignored.items()):
            groups[reason].append(file)
        return [
            {"reason": reason, "count": len(files), "files": files}
            for reason, files in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ]


def take_inventory(
    found: Iterable[str],
    *,
    used: Iterable[str],
    skipped: Iterable[Skip],
    ignored: Iterable[Skip],
    default_reason: Callable[[str], str],
) -> Inventory:
    """Give every file found one fate (first that applies: used, skipped, ignored).

    Args:
        found: every file found, relative POSIX paths.
        used: files that fed a split.
        skipped: skip entries (folder entries and files not found are left out).
        ignored: files a reader or a case declined, with the reason.
        default_reason: the reason for a file nobody spoke about.

    Returns:
        The inventory; its counts add up.
    """
    inventory = Inventory(found=tuple(sorted(set(found))))
    present = set(inventory.found)
    inventory.used = set(_with_partners(used, present)) & present
    for kind, entries in (("skipped", skipped), ("ignored", ignored)):
        reasons: dict[str, str] = {}
        for skip in entries:
            reasons.setdefault(skip.file, skip.reason)
        for file in _with_partners(reasons, present):
            if file not in present or inventory.has(file):
                continue
            reason = reasons.get(file) or reasons.get(_partner(file) or "", "")
            getattr(inventory, kind)[file] = reason
    for file in inventory.found:
        if not inventory.has(file):
            inventory.ignored[file] = default_reason(file)
    return inventory


def _partner(file: str) -> str | None:
    if file_kind(file) not in ("header", "data"):
        return None
    return Path(file).with_name(partner(file).name).as_posix()


def _with_partners(files: Iterable[str], present: set[str]) -> list[str]:
    """``files`` and, for each ``.hdr``/``.img`` among them, its partner if it exists."""
    out = []
    for file in files:
        out.append(file)
        other = _partner(file)
        if other is not None and other in present:
            out.append(other)
    return out


def not_an_input(file: str, fmt: str, layout: str) -> str:
    """The reason for a file no reader spoke about."""
    if file_kind(file) is None:
        hint = "; convert FreeSurfer .mgz with mri_convert" if file.lower().endswith(".mgz") else ""
        return f"not an image file braingen reads ({READABLE}){hint}"
    if fmt == "unknown":
        return "not read: the folder's format was not recognised (see skipped)"
    return f"not part of the {fmt} layout ({layout}); data.format chooses another reader"
