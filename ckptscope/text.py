"""Attacker text from a checkpoint (tensor names, metadata, warnings), decided once for every face.

Two rules:

- ``make_storable``: what a listing may carry into the catalogue, JSON and a terminal. A NUL
  (PostgreSQL cannot store it) or a lone UTF-16 surrogate such as U+D800 (not Unicode text: no
  UTF-8 encoder, database driver or JSON response can write it; safetensors headers carry one as
  the JSON escape ``"\\ud800"``, pickles as BINUNICODE written with ``surrogatepass``) in a tensor
  name, a storage key or a root is refused with ``422 bad_name``; in metadata keys and values and
  in warnings they are replaced by the visible text ``\\x00`` / ``\\ud800``. The server's ingest
  and the CLI both apply it to the parsed listing, so a file gets the same answer from both.
- ``reveal``: text shown on a terminal. Every character that is not printable (C0 and C1
  controls, so ESC sequences, OSC 52 clipboard writes and BEL; bidi overrides such as U+202E;
  zero-width and other invisible characters; line separators; surrogates) becomes a visible
  ``\\xNN`` / ``\\uXXXX`` / ``\\UXXXXXXXX`` escape; the web UI's ``reveal_controls`` uses it too.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ckptscope.errors import Invalid

if TYPE_CHECKING:
    from ckptscope.formats.model import Checkpoint

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def reveal(text: str, keep: str = "") -> str:
    """``text`` with every non-printable character but those in ``keep`` shown as a visible
    escape: with nothing kept, one line, inert on a terminal (no control character, not even a
    newline); the web UI keeps newlines and tabs."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


def storable_text(value: Any) -> Any:
    """``value`` (a string, or lists and dicts of them, keys included) with NULs and lone
    surrogates replaced by the visible text ``\\x00`` / ``\\udXXX``; other values unchanged."""
    if isinstance(value, str):
        return _UNSTORABLE.sub(lambda m: _escape(m.group()), value) if _UNSTORABLE.search(value) else value
    if isinstance(value, dict):
        return {storable_text(k): storable_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable_text(v) for v in value]
    return value


def _refuse_unstorable(what: str, texts: list[str]) -> None:
    if _UNSTORABLE.search("".join(texts)) is None:  # one scan for the usual clean listing
        return
    found = next(m for t in texts if (m := _UNSTORABLE.search(t)))
    text, char = found.string, found.group()
    reason = "a NUL character" if char == "\x00" else f"a lone UTF-16 surrogate ({_escape(char)}, not Unicode text)"
    raise Invalid(f"{what} {text[:80]!r} contains {reason}, which ckptscope cannot store or show", "bad_name")


def make_storable(listing: Checkpoint) -> None:
    """Refuse names that cannot be stored as text (``Invalid``, code ``bad_name``); escape such
    characters in the listing's metadata and warnings, in place."""
    _refuse_unstorable("tensor name", [t.name for t in listing.tensors])
    _refuse_unstorable("storage key", [t.storage.key for t in listing.tensors])
    _refuse_unstorable("root", [r.path for r in listing.roots])
    listing.metadata = storable_text(listing.metadata)
    listing.warnings = [storable_text(w) for w in listing.warnings]
