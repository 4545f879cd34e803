"""Inspect a checkpoint file: listing, optional stats, the module tree, as JSON-ready data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptscope.formats.model import Checkpoint, TensorInfo, contiguous_stride, module_types_under
from ckptscope.stats import TensorStats, TreeNode, build_tree

if TYPE_CHECKING:
    from ckptscope.insights.findings import Thresholds
    from ckptscope.stats.spool import RangeReader

from .insights import Insights, analyse


def parameter_of(param_of: Mapping[str, str] | None, root: str, name: str) -> str | None:
    """The parameter (full name) an optimizer state tensor belongs to; ``name`` relative to ``root``."""
    if not param_of:
        return None
    return param_of.get(f"{root}.{name}" if root else name)


def tensor_record(t: TensorInfo, stats: TensorStats | None = None, parameter: str | None = None) -> dict[str, Any]:
    """``parameter``: for an optimizer state tensor, the parameter it belongs to (``parameter_of``)."""
    record: dict[str, Any] = {
        "name": t.name,
        "dtype": t.shown_dtype,
        "shape": list(t.shape),
        "numel": t.numel,
        "nbytes": t.nbytes,
        "kind": t.kind,
        "kind_source": t.kind_source,
        "quantization": t.quant.describe() if t.quant is not None else None,
        "alias_of": t.alias_of,
        "parameter": parameter,
        "contiguous": t.stride == contiguous_stride(t.shape),
        "data_offset": t.data_offset,
    }
    if stats is not None:
        record["stats"] = stats.to_json()
    return record


@dataclass(slots=True)
class Inspection:
    checkpoint: Checkpoint
    root: str
    tensors: list[TensorInfo]
    stats: Mapping[str, TensorStats] | None
    tree: TreeNode
    thresholds: Thresholds | None = None  # of the findings; None: the defaults

    def insights(self) -> Insights:
        """Init verdicts and findings of these tensors (none without stats)."""
        stats = self.stats or {}
        types = module_types_under(self.checkpoint.module_types, self.root)
        return analyse([(t, stats.get(t.name)) for t in self.tensors], self.thresholds, module_types=types)

    def to_json(self) -> dict[str, Any]:
        ckpt = self.checkpoint
        stats = self.stats or {}
        insights = self.insights()
        return {
            "format": ckpt.format,
            "root": self.root,
            "default_root": ckpt.default_root,
            "roots": [{"path": r.path, "tensor_count": r.tensor_count} for r in ckpt.roots],
            "metadata": ckpt.metadata,
            "warnings": ckpt.warnings,
            "pickle": ckpt.pickle,
            "tensor_count": len(self.tensors),
            "total_bytes": self.tree.nbytes,
            "tensors": [
                tensor_record(t, stats.get(t.name), parameter_of(ckpt.param_of, self.root, t.name))
                | {"init": insights.init[t.name].to_json() if t.name in stats else None}
                for t in self.tensors
            ],
            "tree": self.tree.to_json(),
            "findings": [f.to_json() for f in insights.findings],
        }


def inspect_listing(
    ckpt: Checkpoint,
    *,
    root: str | None = None,
    with_stats: bool = True,
    progress: Any = None,
    device: str | None = None,
    thresholds: Thresholds | None = None,
    reader: RangeReader | None = None,
    dask: str | None = None,
) -> Inspection:
    """A listing's root, with its stats (read from the listing's files, or through ``reader`` where
    they live in an object store; on a Dask cluster with ``dask``, a scheduler address) and module
    tree."""
    root = ckpt.resolve_root(root)
    tensors = ckpt.root_tensors(root)
    stats = None
    if with_stats:
        from ckptscope.stats.devices import resolve_device
        from ckptscope.stats.engine import compute_stats

        if dask:
            from ckptscope.jobs.dask_stats import close_local_clusters, compute_stats_dask
            from ckptscope.stats.spool import LocalFileReader

            try:
                stats = compute_stats_dask(tensors, reader or LocalFileReader(), dask, progress=progress)
            finally:
                close_local_clusters()  # a local:N cluster lives as long as the command
        elif reader is not None:
            from ckptscope.stats.spool import compute_stats_ranged

            stats = compute_stats_ranged(tensors, reader, progress=progress)
        else:
            stats = compute_stats(tensors, progress=progress, device=resolve_device(device))
    return Inspection(
        ckpt, root, tensors, stats, build_tree(tensors, stats, module_types_under(ckpt.module_types, root)), thresholds
    )
