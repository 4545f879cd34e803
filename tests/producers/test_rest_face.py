"""REST: each producer's file uploaded, then GET /api/v1/checkpoints/{id}, its tensors and its tree."""

from __future__ import annotations

import dataclasses

import pytest

from tests.producers.faces import rest_view
from tests.producers.truth import (
    assert_listing,
    assert_pickle_report,
    assert_stats,
    assert_tree_module_types,
)


def test_upload_and_detail(case, api, memo):
    view = rest_view(case, api, memo)
    assert view.created["format"] == case.format
    assert view.created["tensor_count"] == len(case.expected)
    assert view.detail["format"] == case.format
    assert view.detail["default_root"] == case.default_root
    assert "pickle" in view.detail
    if not case.format.startswith("sharded-"):
        assert_pickle_report(view.detail["pickle"], case)


def test_tensors_match_the_producer(case, api, memo):
    view = rest_view(case, api, memo)
    assert len(view.tensors) == len(case.expected)
    assert_listing(view.tensors, case)
    assert_stats({t["name"]: t["stats"] for t in view.tensors}, case)


def test_the_default_page_is_the_weights_root(case, api, memo):
    view = rest_view(case, api, memo)
    page = view.default_tensors
    assert page["root"] == case.default_root
    rooted = case.under(case.default_root)
    assert page["total"] == len(rooted.expected)
    assert_listing(page["tensors"], rooted)


def test_one_tensor_in_detail(case, api, memo):
    """The first tensor, a buffer and a tied tensor where the file has them."""
    view = rest_view(case, api, memo)
    assert view.one
    assert_listing(view.one.values(), _only(case, view.one))
    assert_stats({name: t["stats"] for name, t in view.one.items()}, case)


def test_tree_nodes_carry_the_pickled_module_class(case, api, memo):
    assert_tree_module_types(rest_view(case, api, memo).tree, case)


def _only(case, names):
    return dataclasses.replace(case, expected={n: e for n, e in case.expected.items() if n in names})


@pytest.mark.parametrize("case", ["whole-module"], indirect=True)
def test_a_subtree_keeps_its_module_classes(case, api, memo):
    view = rest_view(case, api, memo)
    cid = view.created["id"]
    sub = api.get(f"/api/v1/checkpoints/{cid}/tree", params={"path": "5", "depth": 1}).json()["tree"]
    assert sub["path"] == "5" and sub["module_type"] == case.module_types["5"]
    assert {c["name"]: c["module_type"] for c in sub["children"]} == {
        "scale": None,
        "offset": None,
        "proj": "torch.nn.modules.linear.Linear",
    }
