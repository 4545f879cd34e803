"""The CLI: ``ckptscope inspect PATH --json`` on each producer's file."""

from __future__ import annotations

import json

import pytest

from tests.producers.conftest import CASE_IDS
from tests.producers.faces import cli_inspect
from tests.producers.truth import assert_listing, assert_pickle_report, assert_stats, assert_tree_module_types
from tests.test_cli import run_cli


def test_listing_and_stats_match_the_producer(case, memo):
    data = cli_inspect(case, memo)  # --root "": every tensor of the file
    assert data["format"] == case.format
    assert data["default_root"] == case.default_root
    assert data["tensor_count"] == len(case.expected)
    assert_listing(data["tensors"], case)
    assert_stats({t["name"]: t.get("stats") for t in data["tensors"]}, case)


def test_tree_nodes_carry_the_pickled_module_class(case, memo):
    assert_tree_module_types(cli_inspect(case, memo)["tree"], case)


@pytest.mark.parametrize("case", [i for i in CASE_IDS if not i.startswith("llama-sharded")], indirect=True)
def test_pickle_report(case, memo):
    data = cli_inspect(case, memo)
    assert "pickle" in data
    assert_pickle_report(data["pickle"], case)


@pytest.mark.parametrize("case", ["whole-module", "training-ckpt"], indirect=True)
def test_the_command_itself_on_its_default_root(case):
    """The real command in a subprocess, as a user runs it: the default root (the weights)."""
    out = run_cli("inspect", str(case.path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["root"] == case.default_root
    rooted = case.under(case.default_root)
    assert_listing(data["tensors"], rooted)
    assert_stats({t["name"]: t.get("stats") for t in data["tensors"]}, rooted)
    assert_tree_module_types(data["tree"], rooted)
    assert_pickle_report(data["pickle"], case)
