"""The tensors page written from the catalogue's columns (ckptscope/api/tensor_rows.py) against the
records the rest of ckptscope builds (tensor_record, TensorStats.to_json, init_json), and the rows
it keeps for finished contents."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from sqlalchemy import update

from ckptscope.api import tensor_rows
from ckptscope.formats.model import module_types_under
from ckptscope.services import insights as insights_svc
from ckptscope.services.inspect import parameter_of, tensor_record
from ckptscope.store.catalogue import Content, StatsState, TensorRow
from tests import factories as f
from tests.helpers import upload, wait_stats


def reference(client, checkpoint_id: str, **params) -> dict:
    """The page as records: every row mapped to TensorInfo/TensorStats and built by the functions
    that define a tensor's JSON, then encoded by the json module."""
    core = client.app.state.core
    _, content = core.queries.get_checkpoint(checkpoint_id)
    root = params.pop("root")
    query = {
        "prefix": params.get("prefix", ""),
        "search": params.get("search", ""),
        "kind": params.get("kind"),
        "only_nonfinite": params.get("nonfinite", False),
        "sort": params.get("sort", "position"),
        "descending": params.get("desc", False),
        "offset": params.get("offset", 0),
        "limit": params.get("limit", 100),
    }
    page = core.queries.tensor_page(content, root, **query)
    types = module_types_under(content.module_types or {}, root)
    return {
        "root": root,
        "total": page.total,
        "offset": query["offset"],
        "limit": query["limit"],
        "stats_state": content.stats_state,
        "tensors": [
            tensor_record(t, None, parameter_of(content.param_of, root, t.name))
            | {
                "stats": None if s is None else s.to_json(with_log_hist=False),
                "init": insights_svc.init_json(t, s, types),
            }
            for t, s in page.rows
        ],
    }


def page(client, checkpoint_id: str, **params) -> dict:
    r = client.get(f"/api/v1/checkpoints/{checkpoint_id}/tensors", params=params)  # root "": the whole file
    assert r.status_code == 200, r.text
    return json.loads(r.text)  # key order kept: the comparison below checks it


def same(a: dict, b: dict) -> None:
    """Equal values with the same keys in the same order, at every level."""
    assert json.dumps(a) == json.dumps(b)


def mixed_checkpoint(path):
    """Parameters, buffers, a tied pair, a non-contiguous view, a view at a storage offset, NaN and
    Inf, a quantized tensor, and an optimizer whose state names its parameters."""
    f.seeded(3)
    model = f.SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    weights = dict(model.state_dict())
    base = torch.randn(6, 5)
    weights["tied.a"] = base
    weights["tied.b"] = base  # one storage: an alias
    weights["view.t"] = torch.randn(4, 3).t()  # strided
    weights["view.tail"] = torch.randn(40)[8:]  # at a storage offset
    weights["bad.w"] = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        weights["q.w"] = torch.quantize_per_tensor(torch.randn(8, 8), 0.05, 3, torch.qint8)
    return f.save_torch({"state_dict": weights, "optimizer": opt.state_dict(), "epoch": 1}, path)


def test_the_page_is_the_records_for_every_kind_of_row_filter_and_root(client, tmp_path):
    cid = upload(client, mixed_checkpoint(tmp_path / "mixed.pt")).json()["id"]
    wait_stats(client, cid)
    cases = [
        {"root": "state_dict"},
        {"root": "state_dict", "sort": "std", "desc": True, "limit": 7},
        {"root": "state_dict", "search": "VIEW"},
        {"root": "state_dict", "kind": "buffer"},
        {"root": "state_dict", "kind": "alias"},
        {"root": "state_dict", "nonfinite": True},
        {"root": "state_dict", "prefix": "view.", "offset": 1, "limit": 2},
        {"root": "optimizer.state"},
        {"root": ""},
    ]
    for params in cases:
        got = page(client, cid, **params)
        same(got, reference(client, cid, **params))
        assert got["tensors"], params
    rows = {t["name"]: t for t in page(client, cid, root="state_dict", limit=1000)["tensors"]}
    assert rows["tied.b"]["alias_of"] == "tied.a"
    assert rows["view.t"]["contiguous"] is False and rows["view.tail"]["data_offset"] > 0
    assert rows["bad.w"]["stats"]["nan"] == 1 and rows["bad.w"]["stats"]["inf"] == 1
    assert rows["q.w"]["quantization"] is not None  # the general path
    optimizer = page(client, cid, root="optimizer.state")["tensors"]
    assert any(t["parameter"] for t in optimizer)


def test_rows_before_the_stats_are_done_are_the_records_too(data_dir, tmp_path, monkeypatch):
    from ckptscope.jobs.runner import JobRunner
    from tests.helpers import make_client

    monkeypatch.setattr(JobRunner, "_run_stats", lambda self, job_id, key: None)
    with make_client(data_dir) as client:
        cid = upload(client, f.save_torch(f.cnn_state_dict(), tmp_path / "a.pt")).json()["id"]
        got = page(client, cid, root="")
        assert got["stats_state"] == "pending" and all(t["stats"] is None and t["init"] is None for t in got["tensors"])
        same(got, reference(client, cid, root=""))


@pytest.mark.parametrize(
    "hist",
    [
        # older catalogues: no percentiles, no magnitude histogram
        '{"bins":[1,2,3],"min":-1.0,"max":2.5,"note":null}',
        '{"bins":[1,2,3],"min":-1.0,"max":2.5,"note":"x","percentiles":null}',
        # a note that looks like the keys after it
        '{"bins":[4],"min":0.5,"max":0.5,"note":"a,\\"percentiles\\":{} ,\\"log\\":1 \\u00e9",'
        '"percentiles":{"50":0.5},"log":{"neg":[],"zero":0,"pos":[[-1,4]]}}',
        '{"bins":[],"min":null,"max":null,"note":"all NaN","percentiles":null,"log":null}',
        # another key order
        '{"min":-1.0,"bins":[1],"max":1.0,"note":null,"percentiles":null,"log":null}',
    ],
)
@pytest.mark.parametrize(
    "init",
    [
        None,  # judged now
        '{"verdict":"trained","matches":"kaiming_uniform_(a=sqrt(5))","score":41.5}',
        '{"verdict":"init","matches":"a, \\"score\\":1","score":null}',
        '{"verdict":"bogus","matches":null,"score":1}',
        '{"verdict":"unknown","matches":null,"score":null,"extra":1}',
    ],
)
def test_any_stored_text_reads_as_the_records_say(client, tmp_path, hist, init):
    """Whatever the stored histogram and verdict look like, the fast path agrees with the records
    or steps aside for them."""
    cid = upload(client, f.save_safetensors({"w": torch.randn(4, 4), "b": torch.randn(4)}, tmp_path / "m.safetensors"))
    cid = cid.json()["id"]
    wait_stats(client, cid)
    core = client.app.state.core
    _, content = core.queries.get_checkpoint(cid)
    with core.catalogue.engine.begin() as conn:
        conn.execute(update(TensorRow).where(TensorRow.content_key == content.key).values(hist=hist, init=init))
    tensor_rows.ROWS.forget(content.key)
    same(page(client, cid, root=""), reference(client, cid, root=""))


def test_finished_rows_are_kept_and_serve_other_orders_and_filters(client, tmp_path, monkeypatch):
    tensors = {f"layers.{i}.weight": torch.randn(3, 4) * (i + 1) for i in range(30)}
    cid = upload(client, f.save_safetensors(tensors, tmp_path / "m.safetensors")).json()["id"]
    wait_stats(client, cid)
    _, content = client.app.state.core.queries.get_checkpoint(cid)
    tensor_rows.ROWS.forget(content.key)
    general = []
    record_json = tensor_rows._record_json
    monkeypatch.setattr(tensor_rows, "_record_json", lambda *a: general.append(a) or record_json(*a))
    same(page(client, cid, root="", limit=10), reference(client, cid, root="", limit=10))
    assert not general  # rows as the stats job stores them are written from their columns
    assert tensor_rows.ROWS.held(content.key) == 10
    # another order of the same rows plus others: the kept ones are reused, the rest made once
    same(
        page(client, cid, root="", sort="std", desc=True, limit=30),
        reference(client, cid, root="", sort="std", desc=True, limit=30),
    )
    assert tensor_rows.ROWS.held(content.key) == 30
    same(page(client, cid, root="", search="layers.2"), reference(client, cid, root="", search="layers.2"))
    assert tensor_rows.ROWS.held(content.key) == 30


def test_kept_rows_go_when_the_stats_are_computed_again(client, tmp_path):
    cid = upload(client, f.save_safetensors({"w": torch.ones(4, 4)}, tmp_path / "m.safetensors")).json()["id"]
    wait_stats(client, cid)
    core = client.app.state.core
    _, content = core.queries.get_checkpoint(cid)
    assert page(client, cid, root="")["tensors"][0]["stats"]["mean"] == 1.0
    assert tensor_rows.ROWS.held(content.key) == 1
    # the stats being computed again (as after a failed job's retry), then done with other values
    with core.catalogue.engine.begin() as conn:
        conn.execute(update(Content).where(Content.key == content.key).values(stats_state=StatsState.RUNNING))
        conn.execute(update(TensorRow).where(TensorRow.content_key == content.key).values(mean=0.25))
    running = page(client, cid, root="")
    assert running["stats_state"] == "running" and running["tensors"][0]["stats"]["mean"] == 0.25
    assert tensor_rows.ROWS.held(content.key) == 0
    with core.catalogue.engine.begin() as conn:
        conn.execute(update(Content).where(Content.key == content.key).values(stats_state=StatsState.DONE))
    assert page(client, cid, root="")["tensors"][0]["stats"]["mean"] == 0.25


def test_a_deleted_and_uploaded_again_checkpoint_reads_its_own_rows(client, tmp_path):
    path = f.save_safetensors({"w": torch.randn(5, 5)}, tmp_path / "m.safetensors")
    first = upload(client, path).json()["id"]
    wait_stats(client, first)
    before = page(client, first, root="")
    assert client.delete(f"/api/v1/checkpoints/{first}").status_code == 204
    assert client.get(f"/api/v1/checkpoints/{first}/tensors").status_code == 404
    second = upload(client, path).json()["id"]
    wait_stats(client, second)
    after = page(client, second, root="")
    same(after, reference(client, second, root=""))
    assert after["tensors"] == before["tensors"]


def test_the_row_cache_keeps_to_its_budget():
    cache = tensor_rows.RowCache(budget=100)
    cache.put("a", "", {0: "x" * 40, 1: "y" * 40})
    cache.put("b", "", {0: "z" * 50})  # over budget: the least recently used content goes
    assert cache.held("a") == 0 and cache.held("b") == 1
    assert cache.get("b", "", [0, 1]) == ["z" * 50, None]
    cache.put("b", "r", {0: "w"})
    cache.forget("b")
    assert cache.held("b") == 0
