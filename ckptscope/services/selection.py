"""Module prefixes: how ``encoder`` / ``encoder.`` select tensors and how prefixes are renamed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ckptscope.errors import Invalid


def normalize_prefix(prefix: str) -> str:
    """``encoder.`` and ``encoder`` both mean the module ``encoder``; "" means everything."""
    if not isinstance(prefix, str):
        raise Invalid("prefixes must be strings")
    return prefix[:-1] if prefix.endswith(".") else prefix


def under(name: str, prefix: str) -> bool:
    """Whether ``name`` is the module/tensor ``prefix`` or inside it (normalized prefix)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def under_any(name: str, prefixes: Iterable[str]) -> bool:
    return any(under(name, p) for p in prefixes)


def rename(name: str, mapping: Mapping[str, str]) -> str | None:
    """Apply the longest matching ``old -> new`` prefix; None when no mapping applies."""
    best: tuple[int, str] | None = None
    for old, new in mapping.items():
        if under(name, old) and (best is None or len(old) > best[0]):
            rest = name[len(old) :].lstrip(".") if old else name
            new = normalize_prefix(new)
            best = (len(old), f"{new}.{rest}" if new and rest else (new or rest))
    return None if best is None else best[1]


def normalize_mapping(mapping: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(mapping, Mapping):
        raise Invalid("mapping must be an object of 'source prefix': 'target prefix'")
    return {normalize_prefix(k): normalize_prefix(v) for k, v in mapping.items()}


def parse_pairs(items: Iterable[str]) -> dict[str, str]:
    """``["encoder.=backbone.", "module.="]`` -> ``{"encoder.": "backbone.", "module.": ""}``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise Invalid(f"{item!r} must look like old=new (new may be empty)")
        old, new = item.split("=", 1)
        out[old] = new
    return out
