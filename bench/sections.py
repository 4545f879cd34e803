"""The bench modules' own sections of BENCHMARKS.md: each rewrites only the text between its
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers (``bench.run`` keeps them when it redraws
the page)."""

from __future__ import annotations

from pathlib import Path


def write_section(out: Path, text: str, begin: str, end: str) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) in place of the old section,
    or at the end of the page where it has none yet."""
    old = out.read_text() if out.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(new)
