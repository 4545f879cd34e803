"""``torch.save(model)``: a whole nn.Module pickled (YOLO and many older repositories). The weights
sit in each module's _parameters/_buffers; the defining classes are not importable where ckptscope
parses (``Scaled`` exists only here: the sandbox child never imports it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.producers.conftest import WHOLE_MODULE_IDS
from tests.producers.faces import cli_inspect, rest_view, sandbox_listing

SCALED = f"{__name__}.Scaled"


class Scaled(nn.Module):
    """A custom layer: a parameter, a persistent buffer whose name says nothing, a non-persistent
    buffer (not in state_dict) and a submodule."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n, n)
        self.scale = nn.Parameter(torch.rand(n) + 0.5)
        self.register_buffer("offset", torch.randn(n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale + self.offset


pytestmark = pytest.mark.parametrize("case", WHOLE_MODULE_IDS, indirect=True)


def test_the_truth_is_what_it_claims(case):
    """The fixture itself: torch refuses the file under weights_only, the custom class is named."""
    assert case.weights_only_loadable is False
    assert SCALED in case.unsafe_globals
    assert case.module_types["5"] == SCALED and case.module_types["0"] == "torch.nn.modules.conv.Conv2d"
    assert "5.scratch" not in case.expected and case.expected["5.offset"].kind == "buffer"


def test_every_module_class_is_recorded(case, memo):
    """Every module of the pickle, tensors or not (ReLU, Flatten), by its dotted path."""
    assert sandbox_listing(case, memo).module_types == case.module_types


def test_the_module_state_says_what_each_tensor_is(case, memo):
    """From _parameters/_buffers, not from names: the custom buffer "offset" is a float tensor
    whose name says nothing."""
    tensors = {t.name: t for t in sandbox_listing(case, memo).tensors}
    assert (tensors["5.offset"].kind, tensors["5.offset"].kind_source) == ("buffer", "file")
    assert (tensors["5.scale"].kind, tensors["5.scale"].kind_source) == ("parameter", "file")
    assert (tensors["1.num_batches_tracked"].kind, tensors["1.num_batches_tracked"].kind_source) == ("buffer", "file")
    assert "5.scratch" not in tensors  # non-persistent: model.state_dict() leaves it out


def test_the_custom_class_is_an_inert_object_in_the_report(case, memo):
    report = sandbox_listing(case, memo).pickle
    assert report is not None
    roles = {g["name"]: g["role"] for g in report["globals"]}
    assert roles.get(SCALED) == "object"
    assert roles.get("torch.nn.modules.conv.Conv2d") == "object"
    assert SCALED in report["safe_globals_needed"]


def test_the_tree_names_the_classes_in_every_face(case, api, memo):
    for tree in (cli_inspect(case, memo)["tree"], rest_view(case, api, memo).tree):
        children = {c["name"]: c for c in tree["children"]}
        assert tree["module_type"] == "torch.nn.modules.container.Sequential"
        assert children["0"]["module_type"] == "torch.nn.modules.conv.Conv2d"
        assert children["1"]["module_type"] == "torch.nn.modules.batchnorm.BatchNorm2d"
        assert children["5"]["module_type"] == SCALED
