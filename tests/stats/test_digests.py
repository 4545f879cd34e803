"""Content digests (stats/digest.py): the same logical tensor has one digest in any file, format,
layout and engine (safetensors, torch .pt views, torch.distributed.checkpoint, stitched), equal to
xxh3-128 of its header and its C-order bytes computed here independently and to
``tensor_digest`` outside the pass; any change of a value, the dtype or the shape changes it.
The new statistics also survive the catalogue's round trip."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash
from safetensors.torch import save_file

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import TensorInfo
from ckptscope.stats import digest as digests
from ckptscope.stats.batch import batchable
from ckptscope.stats.digest import is_digest, tensor_digest
from ckptscope.stats.model import TensorStats
from ckptscope.stats.walk import plan_view
from tests.formats.test_gguf import write_gguf
from tests.stats.test_percentiles import ENGINES, engine_named, sprinkle, stats_apart, stitched_dcp


def logical_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements in C order, in its own dtype (bfloat16 through its int16 bits)."""
    c = t.contiguous()
    if c.dtype == torch.bfloat16:
        c = c.view(torch.int16)
    return c.numpy().tobytes()


def independent_digest(info: TensorInfo, t: torch.Tensor) -> str:
    return "xxh3-128:" + xxhash.xxh3_128(digests.header(info) + logical_bytes(t)).hexdigest()


def values() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(35)
    return {
        "small": torch.randn(64, 48, generator=g),  # batched
        "big": sprinkle(torch.randn(300, 200, generator=g)),  # a per-tensor engine
        "bf16": torch.randn(200, 120, generator=g).bfloat16(),
        "f16_small": torch.randn(30, 7, generator=g).half(),
        "f64": torch.randn(150, 200, generator=g, dtype=torch.float64),
        "i8": torch.randint(-128, 128, (300, 100), generator=g, dtype=torch.int8),
        "i32_small": torch.randint(-1000, 1000, (20, 10), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (200, 90), generator=g, dtype=torch.uint8),
        "bool": torch.rand(300, 70, generator=g) > 0.5,
        "one": torch.tensor([1.5]),
        "nan": torch.full((20, 1000), float("nan")),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """The same logical tensors (and views of others) in every format."""
    base = tmp_path_factory.mktemp("digests")
    plain = values()
    g = torch.Generator().manual_seed(36)
    row = torch.randn(1, 300, generator=g)
    wide = torch.randn(300, 400, generator=g)
    save_file(plain, base / "plain.safetensors")
    materialised = {"expanded": row.expand(70, 300).contiguous(), "sliced": wide[:, ::3].contiguous()}
    save_file(materialised, base / "materialised.safetensors")
    # the same values, the storage transposed (a transposed-then-contiguous view)
    permuted = {name: t.T.contiguous().T for name, t in plain.items() if t.dim() == 2}
    torch.save(permuted | {"expanded": row.expand(70, 300), "sliced": wide[:, ::3]}, base / "views.pt")
    torch.save(plain, base / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(plain, checkpoint_id=base / "dcp")
    stitched = {n: t for n, t in plain.items() if t.shape[0] >= 3}
    return {
        "safetensors": (base / "plain.safetensors", plain),
        "materialised": (base / "materialised.safetensors", materialised),
        "views": (base / "views.pt", permuted | {"expanded": row.expand(70, 300), "sliced": wide[:, ::3]}),
        "torch": (base / "plain.pt", plain),
        "dcp": (base / "dcp" / ".metadata", plain),
        "stitched": (stitched_dcp(base / "stitched", stitched), stitched),
    }


@pytest.fixture(scope="module", params=ENGINES)
def computed(request, files) -> tuple[str, dict[str, dict[str, TensorStats]]]:
    engine = engine_named(request.param)
    return request.param, {k: stats_apart(open_checkpoint(path).tensors, engine) for k, (path, _) in files.items()}


def test_the_fixture_covers_every_path(files):
    listed = {k: {t.name: t for t in open_checkpoint(p).tensors} for k, (p, _) in files.items()}
    assert batchable(listed["safetensors"]["small"]) and not batchable(listed["safetensors"]["big"])
    assert batchable(listed["views"]["small"]) and plan_view(listed["views"]["small"]).stride == (1, 64)
    assert plan_view(listed["views"]["expanded"]).factor == 70 and not plan_view(listed["views"]["sliced"]).dense
    assert all(t.plain for t in listed["dcp"].values())
    assert all(len(t.pieces) == 3 for t in listed["stitched"].values())


@pytest.mark.parametrize("kind", ["safetensors", "materialised", "views", "torch", "dcp", "stitched"])
def test_digests_are_of_the_logical_bytes(files, computed, kind):
    engine, stats = computed
    path, tensors = files[kind]
    for info in open_checkpoint(path).tensors:
        got = stats[kind][info.name].digest
        assert got is not None and is_digest(got), (engine, kind, info.name, got)
        assert got == independent_digest(info, tensors[info.name]), (engine, kind, info.name)
        assert got == tensor_digest(info), (engine, kind, info.name)  # outside the pass: the same


def test_the_same_tensor_has_one_digest_everywhere(computed):
    engine, stats = computed
    for name, plain in stats["safetensors"].items():
        for kind in ("views", "torch", "dcp", "stitched"):
            if name in stats[kind]:
                assert stats[kind][name].digest == plain.digest, (engine, kind, name)
    for name in ("expanded", "sliced"):
        assert stats["views"][name].digest == stats["materialised"][name].digest, (engine, name)
    assert len({s.digest for s in stats["safetensors"].values()}) == len(stats["safetensors"])


def test_the_engines_agree(computed, files):
    engine, stats = computed
    other = "cpu" if engine == "kernel" else "kernel"
    path = files["views"][0]
    theirs = stats_apart(open_checkpoint(path).tensors, engine_named(other))
    assert {n: s.digest for n, s in theirs.items()} == {n: s.digest for n, s in stats["views"].items()}


def digest_of(tmp_path: Path, tensors: dict[str, torch.Tensor], engine: str = "kernel") -> dict[str, str | None]:
    path = tmp_path / f"d{len(list(tmp_path.iterdir()))}.safetensors"
    save_file(tensors, path)
    return {n: s.digest for n, s in stats_apart(open_checkpoint(path).tensors, engine_named(engine)).items()}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [(50, 40), (300, 200)])  # a batch, a per-tensor engine
def test_any_change_changes_the_digest(tmp_path, engine, size):
    g = torch.Generator().manual_seed(37)
    x = torch.randn(*size, generator=g)
    changed = x.clone()
    changed[7, 3] = torch.nextafter(changed[7, 3], torch.tensor(10.0))  # one bit of one element
    nan_payload = x.clone().view(torch.int32)
    nan_payload[0, 0] = 0x7FC00001  # a NaN other than torch's
    other_nan = x.clone().view(torch.int32)
    other_nan[0, 0] = 0x7FC00002
    found = digest_of(
        tmp_path,
        {
            "x": x,
            "changed": changed,
            "as_int32": x.view(torch.int32).clone(),  # the same bytes, another dtype
            "reshaped": x.reshape(size[1], size[0]).clone(),  # the same bytes, another shape
            "flat": x.reshape(-1).clone(),
            "nan_a": nan_payload.view(torch.float32),
            "nan_b": other_nan.view(torch.float32),
        },
        engine,
    )
    assert len(set(found.values())) == len(found), found
    again = digest_of(tmp_path, {"renamed": x.clone()}, engine)
    assert again["renamed"] == found["x"]  # the name is not part of it
    assert all(d is not None and is_digest(d) for d in found.values())


def test_is_digest():
    good = "xxh3-128:" + "0123456789abcdef" * 2
    assert is_digest(good)
    for bad in (
        "",
        "xxh3-128:",
        good[:-1],
        good + "0",
        good.upper(),
        "xxh3-128:" + "g" * 32,
        "sha256:" + "0" * 32,
        "XXH3-128:" + "0" * 32,
        " " + good,
        "0" * 32,
    ):
        assert not is_digest(bad), bad


def test_digests_of_quantized_and_gguf_tensors(tmp_path):
    """Outside and inside the pass agree for the tensors whose digest is not of plain bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.quantize_per_tensor is deprecated
        q = torch.quantize_per_tensor(torch.randn(200, 100), 0.05, 3, torch.qint8)
        q2 = torch.quantize_per_tensor(torch.randn(200, 100), 0.05, 3, torch.qint8)
    torch.save({"q": q, "q2": q2}, tmp_path / "q.pt")
    gguf = write_gguf(tmp_path / "m.gguf", [("a.weight", "Q8_0", (8, 256)), ("b.weight", "F32", (300,))])
    for path in (tmp_path / "q.pt", gguf):
        listed = open_checkpoint(path).tensors
        for engine in ENGINES:
            stats = stats_apart(listed, engine_named(engine))
            for info in listed:
                d = stats[info.name].digest
                assert d is not None and is_digest(d) and d == tensor_digest(info), (path.name, engine, info.name)
        assert len({tensor_digest(i) for i in listed}) == len(listed)


# --- the catalogue round trip ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "views", "stitched"])
def test_stats_survive_the_catalogue_round_trip(tmp_path, files, computed, kind):
    from ckptscope.store.blobs import BlobStore
    from ckptscope.store.catalogue import Catalogue
    from ckptscope.store.queries import CatalogueQueries, StoredFile

    _, stats = computed
    path = files[kind][0]
    listing = open_checkpoint(path)
    catalogue = Catalogue(f"sqlite:///{tmp_path / 'catalogue.db'}")
    try:
        queries = CatalogueQueries(catalogue, BlobStore(tmp_path / "blobs"))
        shas = {str(p): f"{i:064x}" for i, p in enumerate(sorted({str(p) for p in listing.files}))}
        stored = [StoredFile(Path(p).name, sha, Path(p).stat().st_size) for p, sha in shas.items()]
        row, content = queries.register("k" * 64, listing, stored, shas, name="c", origin="upload", provenance=None)
        positions = {t.name: i for i, t in enumerate(listing.tensors)}
        written = queries.save_stats(content.key, {positions[n]: s for n, s in stats[kind].items() if n in positions})
        assert written == len(listing.tensors)
        _, content = queries.get_checkpoint(row.id)
        back = {info.name: s for info, s in queries.all_tensors(content, listing.default_root)}
        assert set(back) == {t.name for t in listing.root_tensors()}
        for name, s in back.items():
            want = stats[kind][name]
            assert s is not None, name
            assert s.percentiles == want.percentiles, name
            assert s.log_hist == want.log_hist, name
            assert s.digest == want.digest and s.digest is not None, name
            assert s.to_json() == want.to_json(), name
    finally:
        catalogue.dispose()
