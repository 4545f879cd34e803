"""Copy into (and out of) checkpoints with tied tensors, checked against what load_state_dict does
to the real transformers model: every name of a tied Parameter gets the copied values, and the
names stay one storage in the written torch file."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from ckptscope.errors import Invalid
from ckptscope.formats import open_checkpoint
from ckptscope.services.operations import CopyReport, copy_report, write_checkpoint

Model = Callable[[], PreTrainedModel]


def llama(tied: bool = True, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to(dtype)


def gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))


def t5() -> PreTrainedModel:
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, tie_word_embeddings=True)
    return T5ForConditionalGeneration(config)


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def save_pretrained_bin(model: PreTrainedModel, directory: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, safe_serialization=False)
    return directory / "pytorch_model.bin"


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def selection(state: Mapping[str, torch.Tensor], mapping: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """What the user hands load_state_dict: the source tensors under the (identity) mapped prefixes."""
    assert all(old == new for old, new in mapping.items())
    prefixes = [p.rstrip(".") for p in mapping]
    return {k: v for k, v in state.items() if any(p == "" or k == p or k.startswith(p + ".") for p in prefixes)}


def load_state_dict_result(
    make: Callable[[], nn.Module], target_file: Path, chosen: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The target model as loaded from its file, after ``load_state_dict(chosen, strict=False)``."""
    model = make()
    model.load_state_dict(load(target_file))
    model.load_state_dict(dict(chosen), strict=False)
    return model.state_dict()


def copy_files(
    source: Path, target: Path, mapping: Mapping[str, str], out: Path, strict: bool = True
) -> tuple[CopyReport, dict[str, torch.Tensor]]:
    src, dst = open_checkpoint(source), open_checkpoint(target)
    report = copy_report(src.root_tensors(), dst.root_tensors(), mapping, strict)
    fmt = "safetensors" if "safetensors" in dst.format else "pt"
    write_checkpoint(out, report.outputs, fmt, {})
    return report, (load_file(out) if fmt == "safetensors" else load(out))


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def assert_same_state(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


def assert_ties(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """The written file ties exactly the names the model ties."""
    for a in want:
        for b in want:
            same = storage(want[a]) == storage(want[b]) and want[a].storage_offset() == want[b].storage_offset()
            assert (storage(got[a]) == storage(got[b])) == same, (a, b)


TIED = [
    # model, the module copied, the target names tied to it
    pytest.param(llama, "model.embed_tokens", ["lm_head.weight"], id="llama-embed"),
    pytest.param(llama, "lm_head", ["model.embed_tokens.weight"], id="llama-lm_head"),
    pytest.param(gpt2, "transformer.wte", ["lm_head.weight"], id="gpt2-wte"),
    pytest.param(
        t5, "shared", ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"], id="t5-shared"
    ),
    pytest.param(
        t5,
        "decoder.embed_tokens",
        ["shared.weight", "encoder.embed_tokens.weight", "lm_head.weight"],
        id="t5-decoder-embed",
    ),
]


@pytest.mark.parametrize(("make", "module", "aliases"), TIED)
def test_copy_into_a_tied_target_updates_every_alias_and_keeps_the_tie(tmp_path, make, module, aliases):
    source = save_pretrained_bin(seeded(make, 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(make, 2), tmp_path / "b")
    target_state = load(target)
    tied = [n for n in target_state if storage(target_state[n]) == storage(target_state[f"{module}.weight"])]
    assert sorted(tied) == sorted([f"{module}.weight", *aliases])  # the fixture really is tied

    mapping = {module: module}
    report, got = copy_files(source, target, mapping, tmp_path / "out.pt")

    want = load_state_dict_result(make, target, selection(load(source), mapping))
    assert_same_state(got, want)
    assert_ties(got, want)
    written = got[f"{module}.weight"]
    assert torch.equal(written, load(source)[f"{module}.weight"])
    assert not torch.equal(written, target_state[f"{module}.weight"])
    for alias in aliases:
        assert storage(got[alias]) == storage(written)
    assert report.ok and report.strict
    assert [c["target"] for c in report.copied] == [f"{module}.weight"]
    in_order = [n for n in target_state if n in aliases]
    assert report.aliases_updated == [
        {"name": n, "via": f"{module}.weight", "source": f"{module}.weight"} for n in in_order
    ]
    data = report.to_json()
    assert data["aliases_updated"] == report.aliases_updated
    assert data["counts"]["aliases_updated"] == len(aliases) and data["counts"]["tied_conflicts"] == 0


def test_copy_from_an_untied_source_into_a_tied_target(tmp_path):
    source = save_pretrained_bin(seeded(lambda: llama(tied=False), 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    mapping = {"lm_head.": "lm_head."}
    report, got = copy_files(source, target, mapping, tmp_path / "out.pt")
    assert_same_state(got, load_state_dict_result(llama, target, selection(load(source), mapping)))
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], load(source)["lm_head.weight"])
    assert report.aliases_updated == [
        {"name": "model.embed_tokens.weight", "via": "lm_head.weight", "source": "lm_head.weight"}
    ]


def test_copy_casts_once_into_the_tied_storage(tmp_path):
    source = save_pretrained_bin(seeded(lambda: llama(dtype=torch.bfloat16), 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    mapping = {"model.embed_tokens": "model.embed_tokens"}
    report, got = copy_files(source, target, mapping, tmp_path / "out.pt")
    want = load_state_dict_result(llama, target, selection(load(source), mapping))
    assert_same_state(got, want)
    assert got["lm_head.weight"].dtype == torch.float32
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])
    assert report.dtype_changes == [{"target": "model.embed_tokens.weight", "from": "bfloat16", "to": "float32"}]
    assert [a["name"] for a in report.aliases_updated] == ["lm_head.weight"]


def test_whole_model_copy_between_tied_checkpoints(tmp_path):
    source = save_pretrained_bin(seeded(t5, 1), tmp_path / "a")
    target = save_pretrained_bin(seeded(t5, 2), tmp_path / "b")
    report, got = copy_files(source, target, {"": ""}, tmp_path / "out.pt")
    want = load_state_dict_result(t5, target, load(source))
    assert_same_state(got, want)
    assert_ties(got, want)
    assert report.ok and not report.aliases_updated and not report.tied_conflicts  # every alias copied itself
    assert len({storage(got[n]) for n in ("shared.weight", "lm_head.weight", "encoder.embed_tokens.weight")}) == 1


def untied_pair(tmp_path: Path, lm_head_first: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """A source whose embedding and lm_head differ (an untied model), optionally with lm_head
    first in the file: the order of the target decides, not the source's."""
    state = seeded(lambda: llama(tied=False), 1).state_dict()
    if lm_head_first:
        state = {"lm_head.weight": state["lm_head.weight"]} | {k: v for k, v in state.items() if k != "lm_head.weight"}
    path = tmp_path / "untied.pt"
    torch.save(state, path)
    return path, load(path)


BOTH = {"model.embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


def test_torch_lets_the_later_target_name_win_a_tied_conflict():
    """What the conflict rule encodes, checked on torch itself: whatever the order of the given
    state dict, the tied Parameter ends with the value of the target's later name."""
    torch.manual_seed(0)
    embed, head = torch.randn(64, 16), torch.randn(64, 16)
    for order in (("model.embed_tokens.weight", "lm_head.weight"), ("lm_head.weight", "model.embed_tokens.weight")):
        model = seeded(llama, 2)
        values = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
        result = model.load_state_dict({k: values[k] for k in order}, strict=False)
        assert "lm_head.weight" not in result.missing_keys and not result.unexpected_keys
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, head)
    model = seeded(llama, 2)
    full = dict(seeded(llama, 1).state_dict()) | {"lm_head.weight": head}
    assert not model.load_state_dict(full, strict=True).missing_keys  # strict=True says nothing about the tie
    assert torch.equal(model.model.embed_tokens.weight, head)


def test_strict_copy_refuses_two_sources_writing_different_values_into_one_tied_storage(tmp_path):
    source, _ = untied_pair(tmp_path)
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    src, dst = open_checkpoint(source), open_checkpoint(target)
    with pytest.raises(Invalid) as err:
        copy_report(src.root_tensors(), dst.root_tensors(), BOTH, strict=True)
    assert err.value.code == "tied_conflict" and err.value.status == 422
    assert "'model.embed_tokens.weight'" in str(err.value) and "'lm_head.weight'" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lm_head_first", [False, True])
def test_non_strict_copy_lets_the_later_target_name_win_and_reports_it(tmp_path, lm_head_first):
    source, source_state = untied_pair(tmp_path, lm_head_first)
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    report, got = copy_files(source, target, BOTH, tmp_path / "out.pt", strict=False)

    want = load_state_dict_result(llama, target, selection(source_state, BOTH))
    assert_same_state(got, want)
    assert torch.equal(got["model.embed_tokens.weight"], source_state["lm_head.weight"])
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])
    assert report.tied_conflicts == [
        {
            "storage": ["model.embed_tokens.weight", "lm_head.weight"],
            "sources": [
                {"source": "model.embed_tokens.weight", "target": "model.embed_tokens.weight"},
                {"source": "lm_head.weight", "target": "lm_head.weight"},
            ],
            "winner": {"source": "lm_head.weight", "target": "lm_head.weight"},
        }
    ]
    assert not report.aliases_updated  # both names were copied: neither is updated only through the tie
    assert report.to_json()["counts"]["tied_conflicts"] == 1


def test_equal_values_from_two_sources_are_no_conflict(tmp_path):
    tied_source = save_pretrained_bin(seeded(llama, 1), tmp_path / "a")  # one storage under both names
    target = save_pretrained_bin(seeded(llama, 2), tmp_path / "b")
    report, got = copy_files(tied_source, target, BOTH, tmp_path / "out.pt", strict=True)
    assert not report.tied_conflicts
    assert_same_state(got, load_state_dict_result(llama, target, selection(load(tied_source), BOTH)))
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])

    state = seeded(lambda: llama(tied=False), 3).state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # two storages, equal values
    torch.save(state, tmp_path / "equal.pt")
    report, got = copy_files(tmp_path / "equal.pt", target, BOTH, tmp_path / "out2.pt", strict=True)
    assert not report.tied_conflicts
    assert torch.equal(got["lm_head.weight"], state["model.embed_tokens.weight"])
    assert storage(got["lm_head.weight"]) == storage(got["model.embed_tokens.weight"])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_tied_source_does_not_tie_an_untied_target(tmp_path, fmt):
    """The target's ties decide the written file's: two names the target keeps apart stay apart
    (and both stay in a safetensors file), whatever the source shares."""
    source = save_pretrained_bin(seeded(llama, 1), tmp_path / "a")
    untied = seeded(lambda: llama(tied=False), 2)
    target = tmp_path / f"b.{fmt}"
    if fmt == "pt":
        torch.save(untied.state_dict(), target)
    else:
        save_file({k: v.contiguous() for k, v in untied.state_dict().items()}, target)
    report, got = copy_files(source, target, {"": ""}, tmp_path / f"out.{fmt}", strict=True)
    want = load_state_dict_result(lambda: llama(tied=False), target, load(source))
    assert set(got) == set(want) and "lm_head.weight" in got
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    if fmt == "pt":
        assert storage(got["lm_head.weight"]) != storage(got["model.embed_tokens.weight"])
    assert not report.aliases_updated and not report.tied_conflicts


def test_a_transposed_view_of_a_written_storage_is_refused(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 6)
    torch.save({"w": w, "wt": w.t()}, tmp_path / "target.pt")  # one storage, two different views
    torch.save({"w": torch.randn(4, 6), "wt": torch.randn(6, 4)}, tmp_path / "source.pt")
    src, dst = open_checkpoint(tmp_path / "source.pt"), open_checkpoint(tmp_path / "target.pt")
    for strict in (True, False):
        with pytest.raises(Invalid) as err:
            copy_report(src.root_tensors(), dst.root_tensors(), {"w": "w"}, strict=strict)
        assert err.value.code == "tied_view" and "'wt'" in str(err.value)


def test_disjoint_views_of_one_storage_copy_one_at_a_time(tmp_path):
    flat = torch.arange(10, dtype=torch.float32)
    torch.save({"a": flat[:4], "b": flat[4:].view(2, 3)}, tmp_path / "target.pt")  # a flat buffer
    source = {"a": torch.full((4,), 7.0), "b": torch.full((2, 3), 9.0)}
    torch.save(source, tmp_path / "source.pt")
    report, got = copy_files(tmp_path / "source.pt", tmp_path / "target.pt", {"a": "a"}, tmp_path / "out.pt")
    assert torch.equal(got["a"], source["a"]) and torch.equal(got["b"], flat[4:].view(2, 3))
    assert not report.aliases_updated
