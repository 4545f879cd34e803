"""Files written by the real producers, built once per session (tiny random-init models made from
config objects, seeded, offline), each with the producer's own view of what it holds (truth.py).

A test takes ``case`` (parametrized over every file in CASE_GROUPS unless it parametrizes ``case``
itself, indirectly, over a subset) and the faces' answers from faces.py."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import make_client
from tests.producers.truth import (
    Case,
    load_torch,
    model_kinds,
    module_truth,
    object_truth,
    optimized,
    resolve_global,
    safetensors_truth,
    sharded_truth,
    torch_file_truth,
    weights_only_loads,
)

# case id -> the session fixture that builds it
CASE_GROUPS: dict[str, str] = {
    **dict.fromkeys(
        [
            "llama-bin",
            "llama-safetensors",
            "llama-sharded-safetensors",
            "llama-sharded-bin",
            "gpt2-bin",
            "gpt2-safetensors",
            "bert-bin",
            "bert-safetensors",
            "t5-bin",
            "t5-safetensors",
        ],
        "transformers_files",
    ),
    **dict.fromkeys(["lora-safetensors", "lora-bin"], "peft_files"),
    "lightning-ckpt": "lightning_files",
    **dict.fromkeys(["unet-safetensors", "unet-bin", "vae-safetensors", "vae-bin"], "diffusers_files"),
    **dict.fromkeys(
        ["whole-module", "whole-module-legacy", "training-ckpt", "keep-vars", "quantized", "meta"], "torch_files"
    ),
}
CASE_IDS = list(CASE_GROUPS)
PICKLED_IDS = [i for i in CASE_IDS if not i.endswith(("safetensors", "sharded-bin"))]
WHOLE_MODULE_IDS = ["whole-module", "whole-module-legacy"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    if any(m.args and m.args[0] == "case" for m in metafunc.definition.iter_markers("parametrize")):
        return
    metafunc.parametrize("case", CASE_IDS, indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> Case:
    group = request.getfixturevalue(CASE_GROUPS[request.param])
    return group[request.param]


@pytest.fixture(scope="session")
def producer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("producers")


@pytest.fixture(scope="session")
def memo() -> dict:
    """Each face's answer for each case, computed once (faces.py)."""
    return {}


@pytest.fixture(scope="session")
def api(tmp_path_factory: pytest.TempPathFactory):
    """One in-process app for the session: every producer's file is uploaded to it once."""
    with make_client(tmp_path_factory.mktemp("api") / "data") as client:
        yield client


def quiet() -> warnings.catch_warnings:
    """The producers warn about everything a tiny CPU model does (no workers, no GPU...)."""
    return warnings.catch_warnings(action="ignore")


def pickled_case(case_id: str, path: Path, expected: dict, allowlist: list | None = None, **kwargs) -> Case:
    """A torch file. ``unsafe_globals``: torch's own scan where the caller does not give it (torch
    scans zip files only); ``allowlist``: the real objects that should make torch.load load it
    (default: those globals, imported here)."""
    zipped = path.read_bytes()[:4] == b"PK\x03\x04"
    if zipped and "unsafe_globals" not in kwargs:
        kwargs["unsafe_globals"] = frozenset(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    loadable = weights_only_loads(path)
    if not loadable:
        if allowlist is None:
            allowlist = [resolve_global(g) for g in kwargs.get("unsafe_globals", ())]
        kwargs["allowlistable"] = weights_only_loads(path, allowlist)
    fmt = "torch-zip" if zipped else "torch-legacy"
    return Case(case_id, path, [path], fmt, expected, weights_only_loadable=loadable, **kwargs)


def safetensors_case(case_id: str, path: Path, kinds: dict[str, str]) -> Case:
    return Case(case_id, path, [path], "safetensors", safetensors_truth(path, kinds))


def _hf_case(case_id: str, directory: Path, model: nn.Module) -> Case:
    kinds = model_kinds(model)
    if (directory / "model.safetensors").exists():
        return safetensors_case(case_id, directory / "model.safetensors", kinds)
    path = directory / "pytorch_model.bin"
    return pickled_case(case_id, path, torch_file_truth(path, kinds))


def _sharded_case(case_id: str, index: Path, model: nn.Module, family: str) -> Case:
    expected, shards = sharded_truth(index, model_kinds(model))
    assert len(shards) >= 2, f"{case_id}: max_shard_size made {len(shards)} shard(s)"
    return Case(case_id, index, [index, *shards], f"sharded-{family}", expected)


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def transformers_files(producer_dir: Path) -> dict[str, Case]:
    transformers = pytest.importorskip("transformers")
    from transformers import BertConfig, GPT2Config, T5Config

    with quiet():
        llama = tiny_llama(0)
        assert llama.lm_head.weight is llama.model.embed_tokens.weight  # tied
        torch.manual_seed(1)
        gpt2 = transformers.GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
        torch.manual_seed(2)
        bert = transformers.BertForSequenceClassification(
            BertConfig(
                vocab_size=64,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
                num_labels=3,
            )
        )
        torch.manual_seed(3)
        t5 = transformers.T5ForConditionalGeneration(
            T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0)
        )
        cases: dict[str, Case] = {}
        for name, model in (("llama", llama), ("gpt2", gpt2), ("bert", bert), ("t5", t5)):
            model.save_pretrained(producer_dir / f"{name}-bin", safe_serialization=False)
            model.save_pretrained(producer_dir / f"{name}-safetensors")
            for flavour in ("bin", "safetensors"):
                cases[f"{name}-{flavour}"] = _hf_case(f"{name}-{flavour}", producer_dir / f"{name}-{flavour}", model)
        llama.save_pretrained(producer_dir / "llama-sharded-safetensors", max_shard_size="20KB")
        llama.save_pretrained(producer_dir / "llama-sharded-bin", max_shard_size="20KB", safe_serialization=False)
        cases["llama-sharded-safetensors"] = _sharded_case(
            "llama-sharded-safetensors",
            producer_dir / "llama-sharded-safetensors" / "model.safetensors.index.json",
            llama,
            "safetensors",
        )
        cases["llama-sharded-bin"] = _sharded_case(
            "llama-sharded-bin", producer_dir / "llama-sharded-bin" / "pytorch_model.bin.index.json", llama, "torch"
        )
    return cases


@pytest.fixture(scope="session")
def peft_files(producer_dir: Path) -> dict[str, Case]:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    with quiet():
        model = peft.get_peft_model(tiny_llama(4), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # LoRA starts with B = 0: give it values, as after some training
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model.save_pretrained(producer_dir / "lora-safetensors")
        model.save_pretrained(producer_dir / "lora-bin", safe_serialization=False)
    # the adapter file names its tensors without the adapter's name ("lora_A.default.weight")
    kinds = model_kinds(model, rename=lambda n: n.replace(".default.", "."))
    st = producer_dir / "lora-safetensors" / "adapter_model.safetensors"
    pt = producer_dir / "lora-bin" / "adapter_model.bin"
    return {
        "lora-safetensors": safetensors_case("lora-safetensors", st, kinds),
        "lora-bin": pickled_case("lora-bin", pt, torch_file_truth(pt, kinds)),
    }


@pytest.fixture(scope="session")
def lightning_files(producer_dir: Path) -> dict[str, Case]:
    pl = pytest.importorskip("pytorch_lightning")

    class TinyLightning(pl.LightningModule):
        def __init__(self, hidden: int = 8, lr: float = 0.1, name: str = "tiny", betas: tuple = (0.9, 0.99)):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    with quiet():
        torch.manual_seed(5)
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        trainer = pl.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=True,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(producer_dir / "lightning"),
        )
        module = TinyLightning()
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        path = producer_dir / "lightning" / "tiny.ckpt"
        trainer.save_checkpoint(path)
    # whatever torch refuses in it (nothing, with Lightning 2.6), allowlisted to read the truth
    unsafe = [resolve_global(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
    loaded = load_torch(path, unsafe)
    kinds = model_kinds(module, "state_dict")
    expected = optimized(object_truth(loaded, kinds), module, "state_dict", "optimizer_states.0")
    case = pickled_case("lightning-ckpt", path, expected, default_root="state_dict", loaded=loaded)
    return {"lightning-ckpt": case}


@pytest.fixture(scope="session")
def diffusers_files(producer_dir: Path) -> dict[str, Case]:
    diffusers = pytest.importorskip("diffusers")
    with quiet():
        torch.manual_seed(6)
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=4,
        )
        torch.manual_seed(7)
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(8,),
            layers_per_block=1,
            latent_channels=2,
            norm_num_groups=4,
            sample_size=8,
        )
        cases: dict[str, Case] = {}
        for name, model in (("unet", unet), ("vae", vae)):
            kinds = model_kinds(model)
            model.save_pretrained(producer_dir / f"{name}-safetensors")
            model.save_pretrained(producer_dir / f"{name}-bin", safe_serialization=False)
            st = producer_dir / f"{name}-safetensors" / "diffusion_pytorch_model.safetensors"
            pt = producer_dir / f"{name}-bin" / "diffusion_pytorch_model.bin"
            cases[f"{name}-safetensors"] = safetensors_case(f"{name}-safetensors", st, kinds)
            cases[f"{name}-bin"] = pickled_case(f"{name}-bin", pt, torch_file_truth(pt, kinds))
    return cases


def whole_module() -> nn.Sequential:
    """A Sequential of torch layers and a custom module class that exists only in the test."""
    from tests.producers.test_whole_module import Scaled

    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), Scaled(5)
    )
    model.train()
    model(torch.randn(2, 3, 6, 6))  # BatchNorm running stats move off their defaults
    return model


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


# what torch.load(weights_only=True) needs allowlisted for the training checkpoint, imported here
TRAINING_SAFE_GLOBALS = [
    argparse.Namespace,
    datetime.datetime,
    pathlib.PosixPath,
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,
]


def training_objects(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "args": argparse.Namespace(lr=0.1, name="x"),
        "epoch": 3,
        "rng": np.random.get_state(),
        "when": datetime.datetime(2026, 1, 1),
        "path": pathlib.Path("/tmp/x"),
    }


@pytest.fixture(scope="session")
def torch_files(producer_dir: Path) -> dict[str, Case]:
    with quiet():
        d = producer_dir / "torch"
        d.mkdir()
        cases: dict[str, Case] = {}

        model = whole_module()
        torch.save(model, d / "whole.pt")
        torch.save(model, d / "whole-legacy.pt", _use_new_zipfile_serialization=False)
        unsafe = frozenset(torch.serialization.get_unsafe_globals_in_checkpoint(d / "whole.pt"))
        classes = {path: f"{type(m).__module__}.{type(m).__qualname__}" for path, m in model.named_modules()}
        for case_id, name in (("whole-module", "whole.pt"), ("whole-module-legacy", "whole-legacy.pt")):
            cases[case_id] = pickled_case(
                case_id, d / name, module_truth(model), module_types=classes, unsafe_globals=unsafe
            )

        torch.manual_seed(9)
        np.random.seed(9)
        cnn = small_cnn()
        opt = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
        cnn(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
        torch.save(training_objects(cnn, opt), d / "train.pt")
        expected = optimized(
            torch_file_truth(d / "train.pt", model_kinds(cnn, "model"), TRAINING_SAFE_GLOBALS),
            cnn,
            "model",
            "optimizer",
        )
        cases["training-ckpt"] = pickled_case(
            "training-ckpt", d / "train.pt", expected, TRAINING_SAFE_GLOBALS, default_root="model"
        )

        torch.manual_seed(10)
        mlp = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        mlp.train()
        mlp(torch.randn(5, 4))
        torch.save(mlp.state_dict(keep_vars=True), d / "keep-vars.pt")  # nn.Parameter objects pickled
        expected = torch_file_truth(d / "keep-vars.pt", model_kinds(mlp))
        cases["keep-vars"] = pickled_case("keep-vars", d / "keep-vars.pt", expected)

        torch.manual_seed(11)
        quantized = {
            "w_q": torch.quantize_per_tensor(torch.randn(4, 5), 0.05, 3, torch.qint8),
            "w_channels": torch.quantize_per_channel(
                torch.randn(3, 4),
                torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64),
                torch.tensor([0, 2, 1]),
                0,
                torch.quint8,
            ),
            "w_channels_t": torch.quantize_per_channel(
                torch.randn(4, 3),
                torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                torch.tensor([1, 0, 2]),
                1,
                torch.qint8,
            ),
            "b": torch.randn(5),
            "dynamic": torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(torch.nn.Linear(5, 3)), {torch.nn.Linear}, dtype=torch.qint8
            ).state_dict(),
        }
        torch.save(quantized, d / "quantized.pt")
        cases["quantized"] = pickled_case("quantized", d / "quantized.pt", torch_file_truth(d / "quantized.pt", {}))

        meta_model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to("meta")
        torch.save(meta_model.state_dict(), d / "meta.pt")
        cases["meta"] = pickled_case("meta", d / "meta.pt", torch_file_truth(d / "meta.pt", model_kinds(meta_model)))
    return cases
