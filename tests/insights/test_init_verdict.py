"""Init-or-trained verdicts, calibrated on real producers: fresh torch.nn modules and fresh tiny
transformers models (saved with ``save_pretrained`` and read back through ckptscope's listing and
stats engine) must never be called "trained"; the same models after a few hundred Adam steps must
mostly be. The error rates measured here are the ones the README quotes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptscope.formats import open_checkpoint
from ckptscope.insights.init_verdict import (
    INIT_SCORE,
    MIN_NUMEL,
    InitVerdict,
    init_verdict,
    untrained_by_module,
    untrained_summary,
)
from ckptscope.stats.engine import compute_stats
from ckptscope.stats.model import PERCENTILES, TensorStats

transformers = pytest.importorskip("transformers")


# --- stats of in-memory tensors, the way the engine defines them (torch.quantile percentiles) ----


def stats_of(t: torch.Tensor, *, percentiles: bool = True) -> TensorStats:
    x = t.detach().to(torch.float64).flatten()
    levels = torch.tensor([float(k) / 100 for k in PERCENTILES], dtype=torch.float64)
    q = torch.quantile(x, levels).tolist() if percentiles else None
    return TensorStats(
        numel=x.numel(),
        mean=x.mean().item(),
        std=x.std().item() if x.numel() > 1 else None,
        min=x.min().item(),
        max=x.max().item(),
        zeros=int((x == 0).sum()),
        percentiles=None if q is None else dict(zip(PERCENTILES, q, strict=True)),
    )


def verdict_of(name: str, t: torch.Tensor, *, dtype: str = "float32", **kw: Any) -> InitVerdict:
    return init_verdict(name, tuple(t.shape), stats_of(t, **kw), dtype=dtype)


# --- the record and the edge cases ---------------------------------------------------------------


def test_json_and_unknowns() -> None:
    w = torch.nn.Linear(64, 32).weight
    v = verdict_of("fc.weight", w)
    assert v.to_json() == {"verdict": "init", "matches": v.matches, "score": v.score}
    assert v.matches is not None and v.matches.startswith("kaiming_uniform_(a=sqrt(5))")
    assert f"bound {1 / math.sqrt(64):.4g}" in v.matches
    s = stats_of(w)
    assert init_verdict("fc.weight", (32, 64), None).verdict == "unknown"
    assert init_verdict("bn.running_var", (32, 64), s, kind="buffer").verdict == "unknown"
    assert init_verdict("fc.weight", (32, 64), s, dtype="int8").verdict == "unknown"
    assert init_verdict("fc.weight", (32, 64), s, dtype="bool").verdict == "unknown"
    assert init_verdict("scale", (), stats_of(torch.tensor([0.3]))).verdict == "unknown"
    assert init_verdict("few", (10,), stats_of(torch.randn(10))) == InitVerdict("unknown", None, None)
    assert init_verdict("fc.weight", (32, 64), replace(s, nan=1)).verdict == "unknown"
    assert init_verdict("fc.weight", (32, 64), replace(s, note="complex")).verdict == "unknown"


@pytest.mark.parametrize(("value", "label"), [(0.0, "zeros"), (1.0, "ones"), (1e-5, "constant 1e-05")])
def test_constants(value: float, label: str) -> None:
    v = verdict_of("ln.weight", torch.full((768,), value))
    assert v == InitVerdict("init", label, 0.0)
    assert verdict_of("tiny.weight", torch.full((3,), value)).verdict == "init"


def test_moving_away_is_trained() -> None:
    torch.manual_seed(0)
    w = torch.nn.Linear(256, 256).weight.detach()
    assert verdict_of("fc.weight", w).verdict == "init"
    for noise in (0.1, 0.3, 1.0):
        v = verdict_of("fc.weight", w + noise * w.std() * torch.randn_like(w))
        assert v.verdict == "trained" and v.score is not None and v.score > INIT_SCORE, (noise, v)
    heavy = verdict_of("fc.weight", w.std() * torch.randn_like(w) ** 3)  # heavy-tailed, same scale
    assert heavy.verdict == "trained"
    assert verdict_of("fc.weight", w + 0.01).verdict == "trained"  # a moved mean alone
    moved = w + 0.3 * w.std() * torch.randn_like(w)
    assert verdict_of("fc.weight", moved, percentiles=False).verdict == "trained"  # min/max/mean/std only


def test_summaries() -> None:
    init = InitVerdict("init", "ones", 0.0)
    trained = InitVerdict("trained", "normal_(0, 0.02)", 40.0)
    unknown = InitVerdict("unknown", None, None)
    verdicts = {
        "enc.0.fc.weight": init,
        "enc.0.fc.bias": init,  # not a weight: not counted
        "enc.1.fc.weight": trained,
        "enc.1.lstm.weight_ih_l0": init,
        "enc.2.fc.weight": unknown,  # no verdict: not counted
        "head.weight": trained,
    }
    assert untrained_summary(verdicts) == (2, 4)
    assert untrained_summary({}) == (0, 0)
    by_module = untrained_by_module(verdicts)
    assert by_module[""] == (4, 2)
    assert by_module["enc"] == (3, 2)
    assert by_module["enc.1"] == (2, 1)
    assert by_module["enc.1.lstm"] == (1, 1)
    assert "enc.2" not in by_module


# --- fresh torch.nn modules: never "trained" -----------------------------------------------------


def _fresh_modules(seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(a), int(b)) for a, b in torch.randint(8, 300, (3, 2), generator=g)]
    mods: list[torch.nn.Module] = [torch.nn.Linear(a, b) for a, b in sizes]
    mods += [
        torch.nn.Conv1d(sizes[0][0] % 32 + 1, 16, 5),
        torch.nn.Conv2d(3, sizes[1][1] % 64 + 8, 3),
        torch.nn.Conv2d(32, 64, 1, groups=4),
        torch.nn.ConvTranspose2d(16, 8, 4),
        torch.nn.Embedding(sizes[2][0] + 10, sizes[2][1] % 64 + 4),
        torch.nn.Embedding(100, 32, padding_idx=0),
        torch.nn.LayerNorm(sizes[0][1]),
        torch.nn.BatchNorm2d(32),
        torch.nn.LSTM(24, 32),
        torch.nn.GRU(16, 24),
        torch.nn.MultiheadAttention(64, 4),
    ]
    for init in (
        torch.nn.init.kaiming_normal_,
        lambda w: torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
        lambda w: torch.nn.init.kaiming_uniform_(w, nonlinearity="relu"),
        lambda w: torch.nn.init.kaiming_uniform_(w, mode="fan_out", nonlinearity="relu"),
        torch.nn.init.xavier_uniform_,
        torch.nn.init.xavier_normal_,
        lambda w: torch.nn.init.normal_(w, 0.0, 0.02),
        lambda w: torch.nn.init.normal_(w, 0.0, 0.01),
        lambda w: torch.nn.init.trunc_normal_(w, std=0.02),
        lambda w: torch.nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04),
    ):
        m = torch.nn.Linear(sizes[1][0], sizes[2][1])
        init(m.weight.data)
        mods.append(m)
    return mods


def _fresh_verdicts(
    seeds: range, dtypes: tuple[torch.dtype, ...], percentiles: bool
) -> list[tuple[str, int, InitVerdict]]:
    out = []
    for seed in seeds:
        for m in _fresh_modules(seed):
            for name, p in m.named_parameters():
                for dtype in dtypes:
                    t = p.detach().to(dtype)
                    tag = f"{seed}:{type(m).__name__}.{name}{tuple(p.shape)}:{dtype}"
                    v = verdict_of(name, t, dtype=str(dtype)[6:], percentiles=percentiles)
                    out.append((tag, p.numel(), v))
    return out


def test_fresh_torch_modules_are_never_trained() -> None:
    """Over seeds, sizes, initialisers and dtypes: false "trained" must be 0; how many come out
    "init" (the rest "unknown": too few elements, e.g. small biases) is measured and bounded."""
    verdicts = _fresh_verdicts(range(6), (torch.float32, torch.bfloat16, torch.float16), percentiles=True)
    trained = [(tag, v) for tag, numel, v in verdicts if v.verdict == "trained"]
    init = sum(v.verdict == "init" for *_, v in verdicts)
    print(
        f"\nfresh torch.nn (fp32/bf16/fp16): {len(trained)} of {len(verdicts)} trained, {init} init, the rest unknown"
    )
    assert trained == []
    unknown = [(tag, v) for tag, numel, v in verdicts if v.verdict == "unknown" and numel >= MIN_NUMEL]
    assert unknown == []  # all the rest are "init"
    scores = [v.score for _, _, v in verdicts if v.score is not None]
    assert max(scores) < INIT_SCORE
    assert len(verdicts) > 800


def test_fresh_torch_modules_without_percentiles() -> None:
    """Degraded path (an engine that gave no percentiles): min/max/mean/std only."""
    verdicts = _fresh_verdicts(range(6), (torch.float32,), percentiles=False)
    assert [(tag, v) for tag, _, v in verdicts if v.verdict == "trained"] == []


def test_percentiles_within_the_engine_contract_stay_init() -> None:
    """Beyond 2**20 elements the engine may report any order statistic within ±0.1% rank."""
    torch.manual_seed(1)
    w = torch.nn.Linear(1536, 1024).weight.detach()
    s = stats_of(w)
    x = w.flatten().to(torch.float64)
    for shift in (-0.001, 0.001):
        levels = torch.tensor([min(1.0, max(0.0, float(k) / 100 + shift)) for k in PERCENTILES], dtype=torch.float64)
        moved = dict(zip(PERCENTILES, torch.quantile(x, levels).tolist(), strict=True))
        v = init_verdict("fc.weight", tuple(w.shape), replace(s, percentiles=moved), dtype="float32")
        assert v.verdict == "init", v
    trained = w + 0.2 * w.std() * torch.randn_like(w)
    assert verdict_of("fc.weight", trained).verdict == "trained"


# --- transformers: fresh and trained, through ckptscope's own listing and stats -------------------

VOCAB, SEQ, HIDDEN = 128, 16, 64
MIN_RATED = 256  # weights this large or more count in the rates (smaller ones: few elements, weak evidence)


def _models(seed: int) -> dict[str, torch.nn.Module]:
    t = transformers
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {
        "bert": t.BertForMaskedLM(
            t.BertConfig(**common, hidden_size=HIDDEN, intermediate_size=128, max_position_embeddings=SEQ)
        ),
        "gpt2": t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=SEQ)),
        "llama": t.LlamaForCausalLM(
            t.LlamaConfig(**common, hidden_size=HIDDEN, intermediate_size=128, num_key_value_heads=2)
        ),
        "opt": t.OPTForCausalLM(
            t.OPTConfig(
                **common, hidden_size=HIDDEN, ffn_dim=128, max_position_embeddings=SEQ, word_embed_proj_dim=HIDDEN
            )
        ),
        "t5": t.T5ForConditionalGeneration(
            t.T5Config(
                vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0
            )
        ),
    }


def _train(model: torch.nn.Module, steps: int, seed: int) -> None:
    """A synthetic task (predict the token after next: (x + 3) mod VOCAB), Adam at a high rate."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
        labels = (ids + 3) % VOCAB
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def _read_back(model: torch.nn.Module, where: Path) -> list[tuple[str, str, InitVerdict]]:
    model.save_pretrained(where, safe_serialization=True)
    checkpoint = open_checkpoint(where / "model.safetensors")
    stats = compute_stats(checkpoint.tensors)
    out = []
    for info in checkpoint.tensors:
        s = stats[info.name]
        assert s.percentiles is not None or s.numel == 0  # the real engine path
        v = init_verdict(info.name, info.shape, s, kind=info.kind, dtype=info.dtype)
        out.append((info.name, "matrix" if len(info.shape) >= 2 else "vector", v))
    return out


@pytest.fixture(scope="module")
def transformer_verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str, InitVerdict]]]:
    torch.set_num_threads(1)
    out: dict[str, list[tuple[str, str, InitVerdict]]] = {}
    for seed in (0, 1):
        for kind, model in _models(seed).items():
            base = tmp_path_factory.mktemp(f"{kind}{seed}")
            out[f"{kind}/{seed}/fresh"] = _read_back(model, base / "fresh")
            if seed == 0:
                _train(model, 150, seed)
                out[f"{kind}/{seed}/trained"] = _read_back(model, base / "trained")
    return out


@pytest.mark.slow
def test_fresh_transformers_are_never_trained(transformer_verdicts) -> None:
    fresh = [(key, n, v) for key, rows in transformer_verdicts.items() if key.endswith("fresh") for n, _, v in rows]
    assert len(fresh) > 200
    assert [(key, n, v) for key, n, v in fresh if v.verdict == "trained"] == []
    init = sum(v.verdict == "init" for _, _, v in fresh)
    print(f"\nfresh transformers: 0 of {len(fresh)} tensors trained, {init} init, the rest unknown")
    assert init / len(fresh) > 0.97, (init, len(fresh))


@pytest.mark.slow
def test_trained_transformers_mostly_trained(transformer_verdicts) -> None:
    rows = [(key, n, kind, v) for key, r in transformer_verdicts.items() if key.endswith("trained") for n, kind, v in r]
    matrices = [(key, n, v) for key, n, kind, v in rows if kind == "matrix"]
    still_init = [(key, n, v) for key, n, v in matrices if v.verdict != "trained"]
    judged = [v for *_, v in rows if v.verdict != "unknown"]
    trained = sum(v.verdict == "trained" for v in judged)
    print(
        f"\ntransformers (BERT, GPT-2, Llama, OPT, T5; hidden {HIDDEN}), trained: {len(still_init)} of {len(matrices)}"
        f" weight matrices still called init; {trained} of {len(judged)} tensors with a verdict called trained"
    )
    assert len(matrices) > 80
    assert len(still_init) / len(matrices) <= 0.15, still_init
    assert trained / len(judged) >= 0.65, (trained, len(judged))  # small vectors (biases) are weak evidence


# --- many seeds and shapes: small MLP/CNN classifiers trained with Adam ---------------------------


def _classifier(width: int, conv: bool) -> torch.nn.Module:
    if conv:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, width // 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width // 4, width // 2, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(width // 2, 10),
        )
    return torch.nn.Sequential(
        torch.nn.Linear(32, width),
        torch.nn.ReLU(),
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def classifier_verdicts(seed: int, width: int, conv: bool, steps: int = 150) -> list[tuple[str, int, str, str]]:
    """(tensor, numel, fresh verdict, trained verdict) for one classifier trained on a synthetic task."""
    torch.manual_seed(seed)
    model = _classifier(width, conv)
    fresh = {n: verdict_of(n, p).verdict for n, p in model.named_parameters()}
    x = torch.randn(64, 3, 8, 8) if conv else torch.randn(128, 32)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), 10)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [(n, p.numel(), fresh[n], verdict_of(n, p).verdict) for n, p in model.named_parameters()]


@pytest.mark.slow
def test_error_rates_over_seeds_and_shapes() -> None:
    """The README's error rates: fresh -> "trained" must be 0; trained -> "init" is measured by size."""
    torch.set_num_threads(1)
    rows = []
    for seed in range(3):
        for width in (64, 128, 256, 512):
            rows += classifier_verdicts(seed, width, conv=False)
        rows += classifier_verdicts(seed, 64, conv=True)
    fresh_trained = [r for r in rows if r[2] == "trained"]
    assert fresh_trained == []
    weights = [r for r in rows if r[0].endswith("weight") and r[1] >= MIN_RATED]
    small = [r for r in weights if r[1] < 10_000]
    large = [r for r in weights if r[1] >= 10_000]
    small_init = sum(r[3] == "init" for r in small)
    large_init = sum(r[3] == "init" for r in large)
    fresh_init = sum(r[2] == "init" for r in weights)
    print(
        f"\nclassifiers: fresh -> trained 0 of {len(rows)} tensors; fresh weights called init {fresh_init} of"
        f" {len(weights)}; trained weights called init: {small_init} of {len(small)} under 10k elements,"
        f" {large_init} of {len(large)} from 10k"
    )
    assert fresh_init == len(weights)
    assert small_init / len(small) <= 0.25
    assert large_init / len(large) <= 0.05


def test_the_laws_a_shape_shares_do_not_carry_one_tensors_name_or_values_to_the_next() -> None:
    """The fan-based candidates are made once per shape: a name-dependent law (GPT-2's residual
    projections, T5's q) and a value-fitted one (a bias's bound) still come from each tensor's own
    name and values, whichever tensor of the shape is judged first."""
    torch.manual_seed(3)
    residual = torch.randn(768, 768) * (0.02 / math.sqrt(2 * 12))
    order = ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_proj.weight"]
    verdicts = {name: init_verdict(name, (768, 768), stats_of(residual), dtype="float32") for name in order}
    for name in order:
        if "c_proj" in name:
            assert verdicts[name].verdict == "init" and "n_layer=12" in (verdicts[name].matches or ""), name
        else:
            assert verdicts[name].verdict == "trained", name  # no residual law for c_attn
    d_kv = 64
    q = torch.randn(512, 512) * (512 * d_kv) ** -0.5
    t5 = init_verdict("block.0.layer.0.SelfAttention.q.weight", (512, 512), stats_of(q), dtype="float32")
    assert t5.verdict == "init" and f"d_kv={d_kv}" in (t5.matches or "")
    plain = init_verdict("block.0.layer.0.SelfAttention.k.weight", (512, 512), stats_of(q), dtype="float32")
    assert "T5 q" not in (plain.matches or "")
    for bound in (0.1, 0.3):
        bias = (torch.rand(4096) * 2 - 1) * bound
        got = init_verdict("fc.bias", (4096,), stats_of(bias), dtype="float32")
        assert got.verdict == "init" and "bound fitted" in (got.matches or "")
        assert abs(float((got.matches or "").rsplit(" ", 1)[-1]) - bound) < 0.01 * bound
