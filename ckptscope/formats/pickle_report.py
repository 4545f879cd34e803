"""The pickle report: every global a pickled checkpoint names, the role it plays, and what
``torch.load(weights_only=True)`` would make of the file.

Users facing "Weights only load failed" get their answer here without running the file: whether
torch >= 2.10 loads it as it is, and otherwise which globals
``torch.serialization.add_safe_globals([...])`` would need (or why no list can help).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .pickle_globals import WEIGHTS_ONLY_BLOCKED_MODULES, weights_only_allowed
from .pickle_graph import Census

ROLES = ("tensor", "data", "object", "call", "refused")
_RANK = {role: i for i, role in enumerate(ROLES)}


class Roles:
    """How each global was used while interpreting (the strongest use wins), and the refused."""

    __slots__ = ("seen", "refused", "also_needed", "blocker")

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], str] = {}
        self.refused: set[tuple[str, str]] = set()
        # classes torch's weights-only BUILD checks that the pickle does not name (the type of a
        # numpy dtype instance: numpy.dtypes.Float32DType for numpy.dtype("f4"))
        self.also_needed: dict[str, None] = {}
        self.blocker: str | None = None  # why no safe-globals list makes the file load

    def used(self, key: tuple[str, str], role: str) -> None:
        known = self.seen.get(key)
        if known is None or _RANK[role] > _RANK[known]:
            self.seen[key] = role


def build_report(census: Census, roles: Roles, default_role: Callable[[tuple[str, str]], str]) -> dict[str, Any]:
    entries = []
    needed = []
    loadable = census.unsupported_opcode is None
    for key, count in census.counts.items():
        qual = f"{key[0]}.{key[1]}"
        role = "refused" if key in roles.refused else roles.seen.get(key) or default_role(key)
        entries.append({"name": qual, "count": count, "role": role})
        if weights_only_allowed(qual):
            continue
        loadable = False
        if role != "refused" and key[0] not in WEIGHTS_ONLY_BLOCKED_MODULES:
            needed.append(qual)
    for qual in roles.also_needed:
        if qual not in needed:
            needed.append(qual)
            loadable = False
    note = None
    if roles.blocker is not None:
        loadable = False
        note = roles.blocker
    elif census.unsupported_opcode is not None:
        note = (
            f"the pickle uses the {census.unsupported_opcode} opcode, which torch's weights-only unpickler does not "
            "read (it reads pickle protocol 2, as torch.save writes): no safe-globals list makes it load"
        )
    elif roles.refused:
        note = "the pickle names globals that could run code; torch.load(weights_only=True) refuses them"
    return {"globals": entries, "weights_only_loadable": loadable, "safe_globals_needed": needed, "note": note}
