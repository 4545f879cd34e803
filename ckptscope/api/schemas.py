"""Response models of the JSON API (they are what /docs shows)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, create_model

from ckptscope.stats.model import STATISTICS
from ckptscope.store.queries import SORTABLE

# Bounds of the operation requests (the body itself is capped by CKPTSCOPE_MAX_BODY_BYTES).
MAX_TEXT = 4096  # characters of one id, root, prefix or name
MAX_ITEMS = 10_000  # prefixes in include/exclude/freeze, entries in a mapping or rename
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Prefixes = Annotated[list[Text], Field(max_length=MAX_ITEMS)]
PrefixMap = Annotated[dict[Text, Text], Field(max_length=MAX_ITEMS)]
# A checkpoint's label (upload form, rename): 1 to 200 characters with at least one that is neither
# white space nor a control character (checkpoint_label trims those; a NUL stays, as visible text).
LABEL_PATTERN = r"[^\x01-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
Label = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=LABEL_PATTERN)]
TensorKind = Literal["parameter", "buffer", "alias"]
PreviewReduce = Literal["mean", "absmax"]
ExportFormat = Literal["safetensors", "pt"]
ExportDtype = Literal["float32", "float16", "bfloat16"]
if TYPE_CHECKING:
    SortKey = str
else:  # the tensor list's sort columns (the catalogue's), as an enum in the schema
    SortKey = Literal[SORTABLE]


def _in_utc(moment: datetime) -> datetime:
    """A catalogue timestamp in UTC: SQLite hands back naive datetimes (they were written in UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# RFC 3339 with its zone in every response, e.g. 2026-12-01T17:02:16.296000Z, whatever the database
Timestamp = Annotated[datetime, AfterValidator(_in_utc), Field(description="RFC 3339, in UTC")]


class LogHistOut(BaseModel):
    neg: list[list[int]] = Field(description="[e, count]: negative values with 2**e <= -x < 2**(e+1), e ascending")
    zero: int = Field(description="zeros")
    pos: list[list[int]] = Field(description="[e, count]: positive values with 2**e <= x < 2**(e+1), e ascending")


class _StatsBase(BaseModel):
    numel: int
    percentiles: dict[str, float] | None = Field(
        None,
        description="percentiles 0.1, 1, 5, 25, 50, 75, 95, 99, 99.9 of the finite values (keys as strings), "
        "linear interpolation between order statistics like torch.quantile, in float64; exact (see the README "
        "for the accuracy contract); null when there is no finite value",
    )
    log_hist: LogHistOut | None = Field(
        None,
        description="counts by sign and binary magnitude (subnormals at the smallest normal exponent minus one); "
        "null in the rows of a /tensors page (GET /tensors/{name} has it)",
    )
    hist: list[int] = Field(description="64 equal-width bins over [hist_min, hist_max] of the finite values")
    hist_min: float | None
    hist_max: float | None
    note: str | None = Field(None, description="why some statistics are absent (e.g. a complex dtype)")
    digest: str | None = Field(
        None,
        description="content digest, 'xxh3-128:<32 hex>' of dtype, shape and the logical bytes in C order (the same "
        "for the same tensor in any file format); GET /api/v1/tensors/by-digest/{digest} finds it elsewhere",
    )


def _stats_model() -> type[BaseModel]:
    """The statistics as the API shows them: one field per declared statistic (STATISTICS)."""
    fields: dict[str, Any] = {
        s.name: (float | None, Field(description=s.doc)) if s.is_float else (int, Field(description=s.doc))
        for s in STATISTICS
    }
    return create_model("StatsOut", __base__=_StatsBase, **fields)


if TYPE_CHECKING:
    StatsOut = _StatsBase
else:
    StatsOut = _stats_model()


class InitOut(BaseModel):
    verdict: str = Field(description="init, trained or unknown")
    matches: str | None = Field(description="the initialiser and its parameters the values match best")
    score: float | None = Field(description="distance to that initialiser (lower is closer)")


class TensorOut(BaseModel):
    name: str
    dtype: str
    shape: list[int]
    numel: int
    nbytes: int
    kind: str = Field(description="parameter or buffer")
    kind_source: str = Field(
        description="file: the file says whether it is a parameter or a buffer (a pickled nn.Parameter or module "
        "state); name: guessed from its name and dtype"
    )
    alias_of: str | None = Field(description="tied tensor: the first name viewing the same data")
    parameter: str | None = Field(
        None,
        description="optimizer state (e.g. Adam's exp_avg): the parameter it belongs to, by its full name "
        "(e.g. model.encoder.layers.0.weight), where the optimizer's parameters match the weights in one way only; "
        "null for other tensors. Optimizer state is listed as a buffer the file says is one",
    )
    quantization: dict[str, Any] | None = Field(
        None,
        description="a torch quantized tensor: its scheme and integer type, scale and zero point (per tensor) or "
        "axis and channel count (per channel); its stats are over the dequantized values",
    )
    contiguous: bool
    data_offset: int
    stats: StatsOut | None = Field(None, description="null while stats are still being computed")
    init: InitOut | None = Field(
        None,
        description="whether the values still look like an initialiser (README 'Init or trained'); null without stats",
    )


class TensorPageOut(BaseModel):
    root: str
    total: int
    offset: int
    limit: int
    stats_state: str
    tensors: list[TensorOut]


class DigestHitOut(BaseModel):
    checkpoint_id: str
    checkpoint_name: str
    sha256: str = Field(description="the checkpoint's content hash")
    root: str = Field(description="the root to open it under (the checkpoint's default root when it lies in it)")
    name: str = Field(description="tensor name or module path relative to root ('' for the root itself)")


class TensorHitOut(DigestHitOut):
    numel: int


class ModuleHitOut(DigestHitOut):
    tensor_count: int = Field(description="tensors in the module")


class TensorsByDigestOut(BaseModel):
    digest: str
    total: int = Field(description="how many there are (items may be fewer: limit)")
    items: list[TensorHitOut]


class ModulesByDigestOut(BaseModel):
    digest: str
    total: int = Field(description="how many there are (items may be fewer: limit)")
    items: list[ModuleHitOut]


class IdenticalElsewhereOut(BaseModel):
    digest: str
    count: int = Field(description="how many other catalogue tensors are identical (items lists the first ones)")
    items: list[TensorHitOut]


class TensorDetailOut(TensorOut):
    root: str
    stats_state: str
    identical_elsewhere: IdenticalElsewhereOut | None = Field(
        None,
        description="the other tensors of the catalogue (other checkpoints, or other names of this one) with the "
        "same digest: dtype, shape and values; null until the stats are computed",
    )


class SpectrumOut(BaseModel):
    name: str
    root: str
    shape: list[int] = Field(description="the matrix decomposed: a 2-D tensor, or [shape[0], prod(shape[1:])]")
    dtype: str = Field(description="what the SVD ran in: float32, or float64 for a float64 tensor")
    device: str = Field(description="where it ran: cpu, or the CUDA stats device")
    count: int = Field(description="how many singular values there are: min(rows, cols)")
    sigma_max: float = Field(description="the largest singular value (the spectral norm)")
    stable_rank: float = Field(description="||A||_F^2 / sigma_max^2")
    effective_rank: float = Field(description="exp(entropy of sigma / sum(sigma)) (Roy & Vetterli)")
    values: list[float] = Field(description="singular values, descending: all, or at most 512 at `ranks`")
    ranks: list[int] = Field(description="0-based rank of each of `values` in the full spectrum")
    sampled: bool = Field(description="true when `values` is a sample of the spectrum")
    cached: bool = Field(description="served from the server's spectrum cache")


class JobOut(BaseModel):
    id: str
    kind: str
    state: str = Field(
        description="queued, running, done, failed, cancelled (checkpoint deleted) or abandoned (the server "
        "stopped; the checkpoint's job_id then names the job that finishes the work)"
    )
    done: int
    total: int
    progress: float
    error: str | None
    created_at: Timestamp
    finished_at: Timestamp | None


class FileOut(BaseModel):
    name: str
    sha256: str
    size: int


class RootOut(BaseModel):
    path: str
    tensor_count: int


class SourceOut(BaseModel):
    """Where a checkpoint registered by reference lives, and what ckptscope last saw of it."""

    url: str = Field(description="the source as registered: s3://bucket/key or file:///path")
    changed_at: str | None = Field(
        description="when ckptscope last saw the source change (it was listed again and its stats "
        "recomputed); null if never"
    )
    missing_at: str | None = Field(
        description="when the source was found gone or unreadable (the listing shown is the last one read); "
        "null while it is there"
    )
    missing_reason: str | None = Field(description="why the source could not be read, while missing_at is set")


class ReferenceIn(BaseModel):
    """Register a checkpoint where it lives instead of uploading it."""

    source: str = Field(
        min_length=1,
        max_length=4096,
        description="s3://bucket/key (a bucket in CKPTSCOPE_SOURCE_BUCKETS) or file:///path (under "
        "CKPTSCOPE_SOURCE_ROOTS): a file, a sharded index, a folder or a torch.distributed.checkpoint directory",
        examples=["s3://models/llama/model.safetensors.index.json"],
    )
    name: Label | None = Field(None, description="a label for the checkpoint (default: the source's last name)")

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"source": "file:///mnt/ckpts/run7/last.ckpt"}]}
    )


class CheckpointOut(BaseModel):
    id: str
    name: str
    sha256: str = Field(description="sha256 of the file (of the sorted name/hash list for a sharded set)")
    format: str
    tensor_count: int
    total_bytes: int = Field(description="bytes of tensor data, tied tensors counted once")
    size_bytes: int = Field(description="bytes uploaded")
    created_at: Timestamp
    origin: str = Field(description="upload, copy, export, or reference (registered where it lives)")
    stats_state: str
    job_id: str | None
    source: SourceOut | None = Field(None, description="for origin reference: the source and its state")


class CheckpointPageOut(BaseModel):
    total: int = Field(description="how many checkpoints there are (items may be fewer: offset, limit)")
    offset: int
    limit: int
    items: list[CheckpointOut] = Field(description="newest first")


class CheckpointPatch(BaseModel):
    name: Label = Field(
        description="the checkpoint's new label (1 to 200 characters, not all blank; control characters become "
        "spaces, leading and trailing blanks are trimmed)",
        examples=["baseline, epoch 12"],
    )

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "baseline, epoch 12"}]})


class PickleGlobalOut(BaseModel):
    name: str = Field(description="module.qualname as the pickle names it")
    count: int = Field(description="times the pickle references it")
    role: str = Field(description="tensor, data, object, call or refused")


class PickleReportOut(BaseModel):
    globals: list[PickleGlobalOut]
    weights_only_loadable: bool = Field(description="torch.load(weights_only=True) on torch >= 2.10 would load it")
    safe_globals_needed: list[str] = Field(
        description="what torch.serialization.add_safe_globals([...]) would need for a weights-only load"
    )
    note: str | None = Field(None, description="why no safe-globals list helps, or what else stands in the way")


class CheckpointDetailOut(CheckpointOut):
    default_root: str
    roots: list[RootOut]
    metadata: dict[str, Any]
    warnings: list[str]
    files: list[FileOut]
    stats_error: str | None
    provenance: dict[str, Any] | None
    pickle: PickleReportOut | None = Field(
        None, description="pickled formats: every global the pickle names, and what torch.load(weights_only=True) needs"
    )


class TreeNodeOut(BaseModel):
    name: str
    path: str
    is_tensor: bool
    has_children: bool
    tensor_count: int
    numel: int
    param_numel: int
    buffer_count: int
    alias_count: int
    nbytes: int
    dtypes: dict[str, int]
    nan: int
    inf: int
    module_type: str | None = Field(None, description="class of the pickled module here (whole-module pickles)")
    layers: int = Field(
        0, description="weight tensors (layers: a Linear, a Conv ...) under this module with an init verdict"
    )
    untrained: int = Field(0, description="of those, the ones that look untrained ('3 of 24 layers look untrained')")
    findings: dict[str, int] = Field(
        default_factory=dict,
        description="findings at or under this node by severity (README 'Findings'); empty until the stats are done",
    )
    digest: str | None = Field(
        None,
        description="module digest (README 'Content identity': from its tensors' names relative to the module and "
        "their digests); GET /api/v1/modules/by-digest/{digest} finds the same module elsewhere; null on tensor "
        "nodes and until the stats are done",
    )
    children: list[TreeNodeOut] | None = None


class TreeOut(BaseModel):
    root: str
    stats_state: str
    tree: TreeNodeOut


class CopyRequest(BaseModel):
    source: Text = Field(description="checkpoint id to copy tensors from")
    target: Text = Field(description="checkpoint id to copy into (never modified; the result is a new checkpoint)")
    mapping: Annotated[PrefixMap, Field(min_length=1)] = Field(
        description="source prefix -> target prefix, e.g. {'encoder.': 'backbone.'}; "
        "{'module.': ''} strips a DDP prefix"
    )
    strict: bool = Field(
        True,
        description="refuse to write when any key is missing, unexpected or mis-shaped, or when two selected "
        "tensors would write different values into one tied target storage (tied_conflict)",
    )
    dry_run: bool = Field(False, description="only report what would happen")
    source_root: Text | None = None
    target_root: Text | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "source": "4f0769a1753b49768ebba314955bc2d6",
                    "target": "f8d72366903645bf9d98e6934f5cf072",
                    "mapping": {"module.encoder.": "backbone."},
                    "dry_run": True,
                }
            ]
        }
    )


class CopyResult(BaseModel):
    written: bool
    report: dict[str, Any] = Field(
        description="copied, missing, unexpected, shape_mismatches, dtype_changes (as load_state_dict sees them); "
        "aliases_updated: target names tied to a copied one (one storage), updated with it: "
        "[{name, via, source}]; tied_conflicts: tied storages two selected tensors fill with different values "
        "(non-strict: the later target name wins, as in load_state_dict): [{storage, sources, winner}]; counts"
    )
    checkpoint: CheckpointOut | None = None


class FreezeRequest(BaseModel):
    freeze: Annotated[Prefixes, Field(min_length=1)] = Field(
        description="modules to freeze, e.g. ['backbone.', 'embed']"
    )
    root: Text | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [{"freeze": ["backbone."]}]})


class ExportRequest(BaseModel):
    include: Prefixes = Field(default_factory=list, description="modules/tensors to keep (all when empty)")
    exclude: Prefixes = Field(default_factory=list, description="modules/tensors to drop")
    rename: PrefixMap = Field(default_factory=dict, description="prefix renames, e.g. {'module.': ''}")
    format: ExportFormat = Field("safetensors", description="the output file's format")
    freeze: Prefixes = Field(default_factory=list, description="embed a freeze plan for these modules")
    root: Text | None = None
    dtype: ExportDtype | None = Field(
        None,
        description="store floating-point tensors in this dtype; quantized GGUF tensors are dequantized to it "
        "(to float32 when not given); integer tensors are kept as they are",
    )

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"include": ["backbone."], "rename": {"module.": ""}, "format": "safetensors"}]}
    )


class ExportResult(CheckpointOut):
    freeze_plan: dict[str, Any] | None = None
    dequantized: dict[str, Any] | None = Field(
        None, description="quantized (GGUF) tensors decoded on export: {dtype, tensors, encodings: {Q4_K: n}}"
    )


RuleText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT, pattern=r"\S")]


class CheckRequest(BaseModel):
    rules: Annotated[list[RuleText], Field(min_length=1, max_length=1000)] = Field(
        description="rules, e.g. ['no-nan', 'max-abs<=100', 'dtype==bf16@model.layers', 'changed-only=lm_head'] "
        "(README 'Gate a CI pipeline' lists them)"
    )
    baseline: Text | None = Field(None, description="checkpoint id to compare with (changed-only=, unchanged=)")
    root: Text | None = None
    baseline_root: Text | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [{"rules": ["no-nan", "max-abs<=100"]}]})


class RuleResultOut(BaseModel):
    rule: str = Field(description="the rule as given")
    passed: bool
    detail: str = Field(description="one line: what was found")
    offenders: list[str] = Field(description="offending tensor (or module) names, at most 50")
    offender_count: int = Field(description="all offenders, listed or not")


class CheckResult(BaseModel):
    passed: bool = Field(description="every rule passed")
    results: list[RuleResultOut]


class FindingOut(BaseModel):
    rule: str = Field(
        description="nan-inf, spike, variance-exploding, variance-collapsed, dead, near-zero, "
        "norm-outlier or untrained-among-trained (README 'Findings')"
    )
    severity: str = Field(description="info, warning or error")
    target: str = Field(description="tensor name or module path, relative to the root")
    level: str = Field(description="tensor or module")
    message: str
    values: dict[str, Any] = Field(description="the offending values (and what they were compared with)")
    threshold: Any = Field(description="the threshold the values crossed")


class ModuleInsightOut(BaseModel):
    layers: int = Field(
        description="weight tensors (layers: a Linear, a Conv ...) under this module with an init verdict"
    )
    untrained: int = Field(description="of those, the ones that look untrained")
    findings: dict[str, int] = Field(description="findings at or under this module by severity")


class FindingsOut(BaseModel):
    root: str
    stats_state: str = Field(description="findings cover the tensors whose stats are computed")
    findings: list[FindingOut]
    modules: dict[str, ModuleInsightOut] = Field(description="module path ('' for the root) -> roll-up")
    thresholds: dict[str, float] = Field(description="the thresholds used (CKPTSCOPE_FINDINGS_THRESHOLDS)")
