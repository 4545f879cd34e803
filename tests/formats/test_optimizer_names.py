"""Optimizer state tied to its parameters: files written by real producers (torch.save of a model
and its optimizer after a step, a Lightning Trainer.fit, a transformers Trainer checkpoint
folder), each compared with the truth the training run itself gives: which nn.Parameter every
optimizer state id stands for (the optimizer's param_groups hold the Parameter objects, the
model's named_parameters() their names)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptscope.formats import open_checkpoint
from ckptscope.formats.model import checkpoint_from_json, checkpoint_to_json
from ckptscope.formats.optimizer_names import unique_placement
from ckptscope.services.operations import freeze_plan
from ckptscope.stats import build_tree
from tests.helpers import make_client, upload

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")


def truth(model: nn.Module, opt: torch.optim.Optimizer, state_path: str, prefix: str) -> dict[str, str]:
    """state tensor name -> parameter name, from the run: the optimizer's state_dict numbers its
    parameters in param_groups order; each is one of the model's Parameters, named by
    named_parameters() (a tied parameter under its first name)."""
    names = {id(p): name for name, p in model.named_parameters()}
    saved = opt.state_dict()
    out: dict[str, str] = {}
    pid = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in saved["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{state_path}.state.{pid}.{key}"] = f"{prefix}.{names[id(p)]}"
            pid += 1
    return out


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(self.norm(h))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    model(torch.randint(0, 10, (5,))).square().mean().backward()
    opt.step()


def save(tmp_path: Path, model: nn.Module, opt: torch.optim.Optimizer, name: str = "train.pt") -> Path:
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    return path


def kinds(ckpt) -> dict[str, tuple[str, str]]:
    return {t.name: (t.kind, t.kind_source) for t in ckpt.tensors}


def test_adam_state_names_its_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step(model, opt)
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    want = truth(model, opt, "optimizer", "model")
    assert len(want) == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq of each
    assert ckpt.param_of == want
    assert ckpt.param_of["optimizer.state.1.exp_avg"] == "model.encoder.layers.0.weight"
    got = kinds(ckpt)
    # the moments are optimizer state, not parameters (the file says so: they sit in its state)
    assert all(got[name] == ("buffer", "file") for name in want)
    # the matched weights are parameters as the file says; BatchNorm's statistics stay buffers
    assert all(got[f"model.{name}"] == ("parameter", "file") for name, _ in model.named_parameters())
    assert got["model.encoder.norm.running_mean"][0] == "buffer"
    # the header's parameter count over the whole file leaves the moments out
    n_params = sum(p.numel() for p in model.parameters())
    assert build_tree(ckpt.root_tensors("")).param_numel == n_params
    # a freeze plan over the whole file never lists a moment as trainable
    plan = freeze_plan(ckpt.root_tensors(""), ["model.encoder.embed"])
    assert not [n for n in plan.trainable if n.startswith("optimizer.")]
    assert plan.trainable_params + plan.frozen_params == n_params
    # the sandbox hands listings over as JSON
    assert checkpoint_from_json(checkpoint_to_json(ckpt)).param_of == want


def test_lightning_fit_checkpoint(tmp_path: Path) -> None:
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    module = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    ckpt = open_checkpoint(path)
    want = truth(module, trainer.optimizers[0], "optimizer_states.0", "state_dict")
    assert want and ckpt.param_of == want
    assert ckpt.param_of["optimizer_states.0.state.0.exp_avg"] == "state_dict.net.0.weight"
    assert all(kinds(ckpt)[name] == ("buffer", "file") for name in want)


def test_tied_parameters_named_once(tmp_path: Path) -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(12, 4)
            self.mid = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 12, bias=False)
            self.lm_head.weight = self.embed.weight  # tied: parameters() yields it once

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.mid(self.embed(x)))

    torch.manual_seed(2)
    model = LM()
    opt = torch.optim.Adam(model.parameters())
    step(model, opt)
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    want = truth(model, opt, "optimizer", "model")
    assert ckpt.param_of == want
    assert "model.lm_head.weight" not in ckpt.param_of.values()  # the tied name is an alias
    assert ckpt.param_of["optimizer.state.0.exp_avg"] == "model.embed.weight"


def test_decay_and_no_decay_groups(tmp_path: Path) -> None:
    """Two param groups, each a filter of named_parameters() (the transformers Trainer's way):
    the optimizer's order is not the model's; the groups interleave into it in one way only."""
    torch.manual_seed(3)
    model = Net()
    named = list(model.named_parameters())
    decay = [p for n, p in named if n.endswith("weight") and "norm" not in n]
    no_decay = [p for n, p in named if not (n.endswith("weight") and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    step(model, opt)
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    want = truth(model, opt, "optimizer", "model")
    assert ckpt.param_of == want
    assert ckpt.param_of["optimizer.state.1.exp_avg"] == "model.encoder.layers.0.weight"


def test_frozen_backbone_same_shapes_gives_no_names(tmp_path: Path) -> None:
    """An optimizer over the head only, whose layers have the backbone's shapes: the state could
    be any of them, so no name is given (and no tensor is called a parameter on that ground)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    assert truth(model, opt, "optimizer", "model")  # the file has state to name...
    assert ckpt.param_of == {}  # ...but not one way to name it
    got = kinds(ckpt)
    assert all(got[n] == ("parameter", "name") for n in got if n.startswith("model."))
    assert all(got[n] == ("buffer", "file") for n in got if n.startswith("optimizer."))


def test_frozen_backbone_distinct_shapes_named(tmp_path: Path) -> None:
    """The same run where the head's shapes occur once: the trainable part is found, in order."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    want = truth(model, opt, "optimizer", "model")
    assert want == {
        "optimizer.state.0.momentum_buffer": "model.1.weight",
        "optimizer.state.1.momentum_buffer": "model.1.bias",
    }
    assert ckpt.param_of == want
    got = kinds(ckpt)
    assert got["model.1.weight"] == ("parameter", "file")
    assert got["model.0.weight"] == ("parameter", "name")  # frozen: the optimizer does not tell


def test_sgd_without_momentum_has_no_state(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step(model, opt)
    ckpt = open_checkpoint(save(tmp_path, model, opt))
    assert truth(model, opt, "optimizer", "model") == {}
    assert ckpt.param_of == {}
    assert {t.kind_source for t in ckpt.tensors} == {"name"}  # nothing to tell by


def test_unique_placement() -> None:
    a, b = (2, 2), (3,)
    assert unique_placement([[a, b]], [a, b]) == [0, 1]
    assert unique_placement([[a]], [a, a]) is None  # either one
    assert unique_placement([[b]], [a, b]) == [-1, 0]
    assert unique_placement([[a, a], [b, b]], [a, b, a, b]) == [0, 2, 1, 3]
    assert unique_placement([[None, b]], [a, b]) == [0, 1]  # no state: any shape, still one way
    assert unique_placement([[a, b, b]], [a, b]) is None  # more parameters than tensors


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_trainer_folder_optimizer_beside_the_model(tmp_path: Path, safe: bool) -> None:
    """A transformers Trainer run: optimizer.pt (decay / no-decay groups, not the model's order)
    beside the model's file (the tied lm_head saved once), matched across the two files. Beside
    pytorch_model.bin (the state_dict's order) every state tensor is named; beside
    model.safetensors (tensors sorted by name: the model's order is lost) only those of a
    parameter whose shape no other parameter has, never a guess."""
    transformers = pytest.importorskip("transformers")

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(8) + i) % 50
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        save_steps=1,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        disable_tqdm=True,
        save_safetensors=safe,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
        trainer.train()
    folder = tmp_path / "run" / "checkpoint-1"
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    assert len(trainer.optimizer.param_groups) == 2  # decay, no decay
    want = truth(model, trainer.optimizer, "optimizer", "model")
    ckpt = open_checkpoint(folder)
    if safe:
        shapes = [tuple(p.shape) for p in model.parameters()]
        single = {f"model.{n}" for n, p in model.named_parameters() if shapes.count(tuple(p.shape)) == 1}
        want = {k: v for k, v in want.items() if v in single}
        assert "optimizer.state.0.exp_avg" in want  # wte: one of a kind
    assert want and ckpt.param_of == want
    got = kinds(ckpt)
    assert all(got[n] == ("buffer", "file") for n in got if n.startswith("optimizer."))
    assert all(got[f"model.{n}"] == ("parameter", "file") for n, _ in model.named_parameters())
    assert build_tree(ckpt.root_tensors("")).param_numel == sum(p.numel() for p in model.parameters())


def test_catalogue_rest_and_page_show_the_parameter(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    step(model, opt)
    path = save(tmp_path, model, opt)
    with make_client(tmp_path / "data") as client:
        created = upload(client, path)
        assert created.status_code == 201, created.text
        cid = created.json()["id"]
        page = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"root": "optimizer", "limit": 500}).json()
        by_name = {t["name"]: t for t in page["tensors"]}
        assert by_name["state.1.exp_avg"]["parameter"] == "model.encoder.layers.0.weight"
        assert by_name["state.1.exp_avg"]["kind"] == "buffer"
        weights = client.get(f"/api/v1/checkpoints/{cid}/tensors", params={"limit": 500}).json()
        assert {t["parameter"] for t in weights["tensors"]} == {None}
        detail = client.get(f"/api/v1/checkpoints/{cid}/tensors/state.1.exp_avg", params={"root": "optimizer"})
        assert detail.json()["parameter"] == "model.encoder.layers.0.weight"
        html = client.get(f"/checkpoints/{cid}", params={"root": "optimizer", "tensor": "state.1.exp_avg"}).text
        assert html.count('exp_avg of <span class="mono">model.encoder.layers.0.weight</span>') == 2  # row, detail
