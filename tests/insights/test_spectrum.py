"""Singular value spectra against torch.linalg.svdvals and numpy, the ranks against their
definitions, the size bound, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ckptscope import cli
from ckptscope.formats import open_checkpoint
from ckptscope.insights import spectrum as spectrum_mod
from ckptscope.insights.spectrum import MAX_SHOWN, Spectrum, SpectrumError, spectrum_of, summarise
from tests import factories as f


@pytest.fixture
def infos(tmp_path):
    f.seeded(3)
    low_rank = torch.randn(64, 5) @ torch.randn(5, 48)
    sd = {
        "w": torch.randn(40, 30),
        "low": low_rank,
        "conv": torch.randn(16, 3, 3, 3),
        "d": torch.randn(20, 25, dtype=torch.float64),
        "tall": torch.randn(700, 600),
        "zero": torch.zeros(6, 4),
        "v": torch.randn(10),
        "nan": torch.tensor([[1.0, math.nan], [0.0, 1.0]]),
        "bf": torch.randn(30, 20).bfloat16(),
    }
    path = f.save_safetensors(sd, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(path)
    return sd, {t.name: t for t in ckpt.root_tensors("")}, path


def test_singular_values_match_torch_and_numpy(infos):
    sd, listed, _ = infos
    got = spectrum_of(listed["w"])
    want = torch.linalg.svdvals(sd["w"]).double().numpy()
    assert got.count == 30 and got.shape == (40, 30) and got.dtype == "float32" and got.device == "cpu"
    np.testing.assert_allclose(got.values, want, rtol=1e-5)
    np.testing.assert_allclose(got.values, np.linalg.svd(sd["w"].double().numpy(), compute_uv=False), rtol=1e-4)
    assert got.sigma_max == pytest.approx(want[0], rel=1e-6)
    assert got.ranks == list(range(30))


def test_stable_and_effective_rank_follow_their_definitions(infos):
    sd, listed, _ = infos
    got = spectrum_of(listed["w"])
    a = sd["w"].double().numpy()
    s = np.linalg.svd(a, compute_uv=False)
    assert got.stable_rank == pytest.approx(np.linalg.norm(a, "fro") ** 2 / s[0] ** 2, rel=1e-5)
    p = s / s.sum()
    assert got.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    low = spectrum_of(listed["low"])  # rank 5: both ranks at most 5, the tail of the spectrum ~0
    assert 1 <= low.stable_rank <= 5 and 1 <= low.effective_rank <= 5.01
    assert low.values[5] < 1e-4 * low.sigma_max
    # exact values: an orthogonal-ish identity has every sigma 1, so both ranks are n
    eye = summarise(np.ones(7), (7, 7), "float32", "cpu")
    assert eye.stable_rank == pytest.approx(7) and eye.effective_rank == pytest.approx(7)
    zero = summarise(np.zeros(4), (6, 4), "float32", "cpu")
    assert zero.sigma_max == zero.stable_rank == zero.effective_rank == 0.0


def test_conv_float64_and_bf16_matrices(infos):
    sd, listed, _ = infos
    conv = spectrum_of(listed["conv"])
    assert conv.shape == (16, 27)
    np.testing.assert_allclose(conv.values, torch.linalg.svdvals(sd["conv"].reshape(16, -1)).numpy(), rtol=1e-5)
    d = spectrum_of(listed["d"])
    assert d.dtype == "float64"
    np.testing.assert_allclose(d.values, torch.linalg.svdvals(sd["d"]).numpy(), rtol=1e-12)
    bf = spectrum_of(listed["bf"])
    np.testing.assert_allclose(bf.values, torch.linalg.svdvals(sd["bf"].float()).numpy(), rtol=1e-5)
    assert spectrum_of(listed["zero"]).stable_rank == 0.0


def test_long_spectra_are_sampled_with_their_ranks(infos):
    sd, listed, _ = infos
    got = spectrum_of(listed["tall"])
    assert got.count == 600 and len(got.values) == MAX_SHOWN and got.to_json()["sampled"]
    assert got.ranks[0] == 0 and got.ranks[-1] == 599 and got.ranks == sorted(set(got.ranks))
    full = torch.linalg.svdvals(sd["tall"]).double().numpy()
    np.testing.assert_allclose(got.values, full[got.ranks], rtol=1e-4)
    assert Spectrum.from_json(got.to_json()) == got


def test_no_spectrum_for_vectors_nan_and_oversized_matrices(infos, monkeypatch):
    _, listed, _ = infos
    with pytest.raises(SpectrumError, match="1-d"):
        spectrum_of(listed["v"])
    with pytest.raises(SpectrumError, match="NaN"):
        spectrum_of(listed["nan"])
    monkeypatch.setattr(spectrum_mod, "MAX_ELEMENTS", 1000)
    with pytest.raises(SpectrumError, match="at most 1,000") as caught:
        spectrum_of(listed["w"])
    assert caught.value.status == 422 and caught.value.code == "spectrum_too_large"
    monkeypatch.setattr(spectrum_mod, "MAX_ELEMENTS", 1 << 26)
    monkeypatch.setattr(spectrum_mod, "MAX_WORK", 20 * 20 * 20)
    with pytest.raises(SpectrumError, match="too slow"):
        spectrum_of(listed["w"])
    spectrum_mod.check_size(4096, 4096, "cuda")  # the GPU's budget is larger
    with pytest.raises(SpectrumError):
        spectrum_mod.check_size(4096, 4096, "cpu")


def test_cli_spectrum(infos, capsys):
    sd, _, path = infos
    assert cli.main(["spectrum", str(path), "w", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "w" and data["count"] == 30
    assert data["sigma_max"] == pytest.approx(torch.linalg.svdvals(sd["w"])[0].item(), rel=1e-6)
    assert cli.main(["spectrum", str(path), "conv"]) == 0
    out = capsys.readouterr().out
    assert "16 x 27 matrix" in out and "stable rank" in out and "effective rank" in out
    assert cli.main(["spectrum", str(path), "v"]) == 2
    assert "1-d" in capsys.readouterr().err


def test_spectra_run_on_cuda_only_when_the_stats_device_is_cuda():
    from ckptscope.services.previews import stats_device

    for setting in ("", "host", "cpu"):
        assert stats_device(setting) is None
    if torch.cuda.is_available():
        assert stats_device("auto") == "cuda" and stats_device("cuda:0") == "cuda:0"
    else:
        assert stats_device("auto") is None and stats_device("cuda") is None  # serve refuses the latter


def test_the_server_passes_its_stats_device_to_the_svd(client, tmp_path, monkeypatch):
    from ckptscope.services import previews
    from tests.helpers import upload

    seen = []
    monkeypatch.setattr(previews, "stats_device", lambda requested: "cuda:3")
    real = previews.spectrum_for

    def on_cpu_instead(info, device=None):
        seen.append(device)
        return real(info, None)

    monkeypatch.setattr(previews, "spectrum_for", on_cpu_instead)
    r = upload(client, f.save_safetensors({"w": torch.randn(5, 4)}, tmp_path / "w.safetensors"))
    body = client.get(f"/api/v1/checkpoints/{r.json()['id']}/tensors/w/spectrum").json()
    assert seen == ["cuda:3"] and body["count"] == 4
