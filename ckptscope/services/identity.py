"""Content identity across the catalogue and for copies: where else a tensor or module is (by digest),
and a copy checked bit-exact after it was written.

Tensor digests are the stats pass's (``TensorStats.digest``, ``ckptscope.stats.digest``); module
digests are ``ckptscope.insights.identity``'s, stored for every content whose stats are saved."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptscope.errors import CkptscopeError, Invalid
from ckptscope.formats import Checkpoint, TensorInfo
from ckptscope.formats.model import relative_name
from ckptscope.insights.identity import module_identities
from ckptscope.stats import TensorStats
from ckptscope.stats.digest import is_digest, tensor_digest
from ckptscope.store.catalogue import StatsState

from .selection import under

if TYPE_CHECKING:
    from ckptscope.core import Core
    from ckptscope.formats.writers import OutputTensor
    from ckptscope.store.catalogue import Content
    from ckptscope.store.queries import DigestHit

    from .operations import CopyReport

MAX_HITS = 1000  # hits one by-digest request may ask for
ELSEWHERE_SHOWN = 10  # other places a tensor detail lists (the count says how many there are)


# --- where else ---------------------------------------------------------------------------------


def check_digest(digest: str) -> str:
    if not is_digest(digest):
        raise Invalid(
            f"{digest[:80]!r} is not a digest: expected 'xxh3-128:' and 32 lower-case hex digits", "bad_digest"
        )
    return digest


def placed(content: Content, full_name: str) -> tuple[str, str]:
    """(root, name relative to it) to show a full tensor name or module path under: the content's
    default root when the name lies in it, else the longest root holding it, else the whole file."""
    roots = [content.default_root] + sorted((r["path"] for r in content.roots), key=len, reverse=True)
    for root in roots:
        if root == "" or full_name == root:
            return root, "" if full_name == root else full_name
        rel = relative_name(full_name, root)
        if rel is not None:
            return root, rel
    return "", full_name


def hit_json(hit: DigestHit, *, module: bool = False) -> dict[str, Any]:
    root, name = placed(hit.content, hit.name)
    return {
        "checkpoint_id": hit.checkpoint.id,
        "checkpoint_name": hit.checkpoint.name,
        "sha256": hit.content.key,
        "root": root,
        "name": name,
        ("tensor_count" if module else "numel"): hit.size,
    }


def tensors_with_digest(core: Core, digest: str, limit: int = 100) -> dict[str, Any]:
    """Every catalogue tensor with this digest: {digest, total, items: [{checkpoint_id,
    checkpoint_name, sha256, root, name, numel}]} (at most ``limit`` items, oldest checkpoint first)."""
    total, hits = core.queries.tensors_by_digest(check_digest(digest), limit=min(limit, MAX_HITS))
    return {"digest": digest, "total": total, "items": [hit_json(h) for h in hits]}


def modules_with_digest(core: Core, digest: str, limit: int = 100) -> dict[str, Any]:
    """Every catalogue module with this (module) digest, as ``tensors_with_digest`` (``tensor_count``
    in place of ``numel``)."""
    total, hits = core.queries.modules_by_digest(check_digest(digest), limit=min(limit, MAX_HITS))
    return {"digest": digest, "total": total, "items": [hit_json(h, module=True) for h in hits]}


def identical_elsewhere(
    core: Core, checkpoint_id: str, root: str, name: str, stats: TensorStats | None, limit: int = ELSEWHERE_SHOWN
) -> dict[str, Any] | None:
    """The other catalogue tensors identical to this one (``name`` relative to ``root``): other
    checkpoints' and other names of this one (a tied copy): {digest, count, items} with at most
    ``limit`` items; None while the tensor has no digest (stats not computed yet)."""
    if stats is None or stats.digest is None:
        return None
    full = f"{root}.{name}" if root else name
    total, hits = core.queries.tensors_by_digest(stats.digest, limit=limit, exclude=(checkpoint_id, full))
    return {"digest": stats.digest, "count": total, "items": [hit_json(h) for h in hits]}


def decorate_tree(core: Core, content: Content, root: str, tree: dict[str, Any]) -> dict[str, Any]:
    """Give every module node of a tree JSON (``TreeNode.to_json``, paths relative to ``root``) its
    module digest (``digest``; None until the stats are saved, and on tensor nodes)."""
    top = tree["path"]
    full = f"{root}.{top}" if root and top else root or top
    done = content.stats_state == StatsState.DONE  # saved with the stats: none to look up before
    digests = core.queries.module_digests_of(content.key, full) if done else {}
    stack = [tree]
    while stack:
        node = stack.pop()
        path = node["path"]
        node["digest"] = None if node["is_tensor"] else digests.get(f"{root}.{path}" if root and path else root or path)
        stack.extend(node.get("children") or ())
    return tree


# --- copy verification --------------------------------------------------------------------------


class CopyNotVerified(CkptscopeError):
    """A written copy whose tensors are not the ones it should hold: nothing is kept or registered.
    422: the sources cannot be copied faithfully (the server never keeps a copy it cannot vouch for)."""

    status = 422
    default_code = "copy_not_verified"

    def __init__(self, verification: CopyVerification) -> None:
        bad = verification.mismatched
        names = ", ".join(repr(m["target"]) for m in bad[:5]) + (" ..." if len(bad) > 5 else "")
        super().__init__(
            f"copy verification failed: {len(bad)} written tensors differ from their sources ({names}); "
            "nothing was kept"
        )
        self.verification = verification
        self.extra = {"verified": verification.to_json()}


@dataclass(slots=True)
class CopyVerification:
    """The written copy read back: each copied target tensor's digest against its source's."""

    identical: list[str] = field(default_factory=list)  # target names holding exactly the source's values
    mismatched: list[dict[str, Any]] = field(default_factory=list)  # {target, source, expected, written}
    # per mapping entry: whether the target's module is now identical to the source's (same
    # tensors under the same relative names): {source, target, identical, source_digest, target_digest}
    modules: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "identical": self.identical,
            "mismatched": self.mismatched,
            "modules": self.modules,
            "counts": {
                "identical": len(self.identical),
                "mismatched": len(self.mismatched),
                "modules_identical": sum(1 for m in self.modules if m["identical"]),
                "modules": len(self.modules),
            },
        }


class _Digests:
    """Digests by name, from those already known (the catalogue's stats) or computed once on demand."""

    def __init__(self, tensors: Iterable[TensorInfo], known: Mapping[str, str | None] | None = None) -> None:
        self.tensors = {t.name: t for t in tensors}
        self.known: dict[str, str] = {k: v for k, v in (known or {}).items() if v is not None}

    def __call__(self, name: str) -> str | None:
        digest = self.known.get(name)
        if digest is None and name in self.tensors:
            digest = self.known[name] = tensor_digest(self.tensors[name])
        return digest


def verify_copy(
    report: CopyReport,
    source_tensors: Sequence[TensorInfo],
    written: Sequence[TensorInfo],
    *,
    source_digests: Mapping[str, str | None] | None = None,
    dropped: Mapping[str, str] | None = None,
) -> CopyVerification:
    """Check a written copy (``written``: the new file's tensors) against the report that made it:
    every copied target tensor (and each tied name updated with it) must have the digest of what
    it was copied from (the source's own, or for a cast or decoded tensor that of the values the
    writer was to store); then, per mapping entry, whether the target module now equals the
    source's (``source_tensors``: the source root's tensors, as the copy saw them).
    ``source_digests``: the source tensors' digests where known (else computed); ``dropped``: tied
    names a safetensors file leaves out -> the name it keeps (``ckptscope.tied``)."""
    dropped = dict(dropped or {})
    outputs = {o.name: o for o in report.outputs}
    source = _Digests(source_tensors, source_digests)
    target = _Digests(written)

    def written_digest(name: str) -> str | None:
        return target(dropped.get(name, name))

    result = CopyVerification()
    copied = [c["target"] for c in report.copied] + [a["name"] for a in report.aliases_updated]
    for target_name in copied:
        o = outputs[target_name]
        expected = source(o.source.name) if _stores_source_bytes(o) else _expected_digest(o)
        got = written_digest(target_name)
        if got is not None and got == expected:
            result.identical.append(target_name)
        else:
            result.mismatched.append(
                {"target": target_name, "source": o.source.name, "expected": expected, "written": got}
            )
    for src_prefix, dst_prefix in report.mapping.items():
        src_names = [t.name for t in source_tensors if under(t.name, src_prefix)]
        dst_names = [o.name for o in report.outputs if under(o.name, dst_prefix)]
        a = _prefix_digest(src_prefix, [(n, source(n)) for n in src_names])
        b = _prefix_digest(dst_prefix, [(n, written_digest(n)) for n in dst_names])
        result.modules.append(
            {
                "source": src_prefix,
                "target": dst_prefix,
                "identical": a is not None and a == b,
                "source_digest": a,
                "target_digest": b,
            }
        )
    return result


def _stores_source_bytes(o: OutputTensor) -> bool:
    """Whether the output stores the source's own values in its own dtype (then its digest is the
    source's); otherwise (a cast, a dequantization) the file holds the converted values."""
    s = o.source
    return o.out_dtype == s.dtype == s.shown_dtype and s.quant is None and s.encoding is None


def _expected_digest(o: OutputTensor) -> str:
    """The digest of the values the writer was to store for ``o`` (a cast or decoded tensor), as a
    plain ``out_dtype`` tensor of the file read back would have it."""
    from ckptscope.formats.writers import iter_tensor_bytes
    from ckptscope.stats import digest

    stored = o.source._replace(dtype=o.out_dtype, encoding=None, file_dtype=None, quant=None, pieces=())
    digester = digest.new_digester(stored)
    for part in iter_tensor_bytes(o):
        digester.update(part)
    return digest.finish(digester)


def _prefix_digest(prefix: str, named: Sequence[tuple[str, str | None]]) -> str | None:
    """The digest of the module or tensor ``prefix`` among ``named`` (full names): a tensor's own, or
    the module's from its members' names relative to it; None when unknown or absent."""
    if not named:
        return None
    for name, digest in named:
        if name == prefix:
            return digest  # a tensor
    ids = module_identities(named)
    found = ids.get(prefix)
    return None if found is None else found.digest


def verify_written(
    written: Checkpoint,
    report: CopyReport,
    source_tensors: Sequence[TensorInfo],
    metadata: Mapping[str, str],
    *,
    source_digests: Mapping[str, str | None] | None = None,
) -> CopyVerification:
    """Verify the copy just written (``written``: its file read back, as the caller reads untrusted
    files: in the sandbox; ``metadata``: as ``write_checkpoint`` left it) with ``verify_copy``; the
    verification lands in ``report.verified``. Raises ``CopyNotVerified`` on any mismatch: the
    caller then keeps nothing."""
    import json

    dropped = json.loads(metadata.get("ckptscope.tied", "{}"))
    verification = verify_copy(report, source_tensors, written.tensors, source_digests=source_digests, dropped=dropped)
    report.verified = verification.to_json()
    if not verification.ok:
        raise CopyNotVerified(verification)
    return verification
