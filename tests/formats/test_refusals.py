"""Formats that stay unread are refused in their own words: ONNX (any exporter), TensorFlow
SavedModel, HDF5, NumPy .npy/.npz, torch.export .pt2, TorchScript, Keras 3 .keras. Each file is
made by its producer where the producer is installed (onnx, torch, numpy; keras and h5py when
present), else by its documented layout; each refusal is checked in the library, the CLI (one
line, exit 2) and REST (422 problem+json)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptscope.errors import CheckpointError
from ckptscope.formats import open_checkpoint, sniff
from tests import factories as f
from tests.helpers import assert_one_line_refusal, upload

# --- the files ---------------------------------------------------------------------------------


def onnx_model(path: Path, producer: str, *, initializer: int = 0) -> Path:
    """onnx.helper.make_model of a one-node graph (optionally with a large initializer, so the
    graph is far longer than the sniffed head)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones(initializer, dtype=np.float32), "w")] if initializer else []
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name=producer, producer_version="1.0")
    onnx.save(model, path)
    return path


def onnx_from_torch(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),), str(path), dynamo=False)
    return path


def npz(path: Path, *, compressed: bool = False) -> Path:
    save = np.savez_compressed if compressed else np.savez
    with path.open("wb") as fh:
        save(fh, weight=np.ones((2, 3), dtype=np.float32), bias=np.zeros(2))
    return path


def npy(path: Path) -> Path:
    with path.open("wb") as fh:
        np.save(fh, np.arange(6, dtype=np.float32))
    return path


def pt2(path: Path) -> Path:
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    torch.export.save(program, path)
    return path


def torchscript(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    return path


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def hdf5(path: Path, *, user_block: int = 0) -> Path:
    """An HDF5 file: h5py's when installed, else the signature and a version-0 superblock start
    (the format specification's first bytes), after an optional user block."""
    try:
        import h5py
    except ImportError:
        path.write_bytes(bytes(user_block) + HDF5_SIGNATURE + bytes([0, 0, 0, 0, 0, 8, 8, 0]) + bytes(200))
        return path
    with h5py.File(path, "w", userblock_size=user_block or 0) as fh:
        fh.create_dataset("dense/kernel", data=np.ones((3, 2), dtype=np.float32))
    return path


def keras_layout(path: Path) -> Path:
    """A Keras 3 ``.keras`` as keras.saving writes it: a zip of metadata.json, config.json and
    model.weights.h5 (stored)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1", "date_saved": "2026-01-01"}))
        z.writestr("config.json", json.dumps({"module": "keras", "class_name": "Sequential", "config": {}}))
        z.writestr("model.weights.h5", HDF5_SIGNATURE + bytes(100))
    return path


def saved_model_pb(path: Path) -> Path:
    """A TensorFlow SavedModel protobuf (saved_model.proto's field numbers: SavedModel {int64
    saved_model_schema_version = 1; repeated MetaGraphDef meta_graphs = 2}, MetaGraphDef
    {MetaInfoDef meta_info_def = 1; GraphDef graph_def = 2}, ...), encoded by the protobuf runtime
    from a descriptor built here (TensorFlow itself is not installed)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    T = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="tf_saved_model_test.proto", package="tftest", syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, str | None, bool]) -> None:
        m = fd.message_type.add(name=name)
        for fname, number, ftype, type_name, repeated in fields:
            field = m.field.add(name=fname, number=number, type=ftype)
            field.label = T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL
            if type_name:
                field.type_name = f".tftest.{type_name}"

    message("NodeDef", ("name", 1, T.TYPE_STRING, None, False), ("op", 2, T.TYPE_STRING, None, False))
    message("VersionDef", ("producer", 1, T.TYPE_INT32, None, False))
    message(
        "GraphDef", ("node", 1, T.TYPE_MESSAGE, "NodeDef", True), ("versions", 4, T.TYPE_MESSAGE, "VersionDef", False)
    )
    message(
        "MetaInfoDef",
        ("meta_graph_version", 1, T.TYPE_STRING, None, False),
        ("tags", 4, T.TYPE_STRING, None, True),
        ("tensorflow_version", 5, T.TYPE_STRING, None, False),
    )
    message(
        "MetaGraphDef",
        ("meta_info_def", 1, T.TYPE_MESSAGE, "MetaInfoDef", False),
        ("graph_def", 2, T.TYPE_MESSAGE, "GraphDef", False),
    )
    message(
        "SavedModel",
        ("saved_model_schema_version", 1, T.TYPE_INT64, None, False),
        ("meta_graphs", 2, T.TYPE_MESSAGE, "MetaGraphDef", True),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tftest.SavedModel"))
    saved = cls(saved_model_schema_version=1)
    graph = saved.meta_graphs.add()
    graph.meta_info_def.tags.append("serve")
    graph.meta_info_def.tensorflow_version = "2.16.1"
    for i in range(20):
        node = graph.graph_def.node.add()
        node.name, node.op = f"dense/kernel_{i}", "VarHandleOp"
    graph.graph_def.versions.producer = 1700
    path.write_bytes(saved.SerializeToString())
    return path


# --- each format, its code and its words --------------------------------------------------------

CASES: list[tuple[str, Callable[[Path], Path], str, str]] = [
    ("onnx-no-producer", lambda p: onnx_model(p, ""), "onnx", "ONNX model"),
    ("onnx-tf2onnx", lambda p: onnx_model(p, "tf2onnx"), "onnx", "ONNX model"),
    ("onnx-skl2onnx", lambda p: onnx_model(p, "skl2onnx"), "onnx", "ONNX model"),
    ("onnx-custom-producer", lambda p: onnx_model(p, "my exporter"), "onnx", "ONNX model"),
    ("onnx-large-initializer", lambda p: onnx_model(p, "x", initializer=100_000), "onnx", "ONNX model"),
    ("onnx-torch-export", onnx_from_torch, "onnx", "ONNX model"),
    ("savedmodel", saved_model_pb, "tf_savedmodel", "TensorFlow SavedModel"),
    ("hdf5", hdf5, "hdf5", "HDF5 file"),
    ("hdf5-user-block", lambda p: hdf5(p, user_block=512), "hdf5", "HDF5 file"),
    ("npy", npy, "numpy", "NumPy .npy"),
    ("npz", npz, "numpy_npz", "NumPy .npz archive"),
    ("npz-compressed", lambda p: npz(p, compressed=True), "numpy_npz", "NumPy .npz archive"),
    ("pt2", pt2, "torch_export", "torch.export archive"),
    ("torchscript", torchscript, "torchscript", "TorchScript archive"),
    ("keras", keras_layout, "keras", "Keras 3 model"),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    return {case_id: make(root / f"{case_id}.bin") for case_id, make, _, _ in CASES}


@pytest.mark.parametrize(("case_id", "code", "words"), [(c[0], c[2], c[3]) for c in CASES], ids=IDS)
def test_library_refuses_naming_the_format(made, case_id, code, words):
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(made[case_id])
    assert err.value.code == code, err.value.message
    assert words in err.value.message and "\n" not in err.value.message


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptscope.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("case_id", "words"), [(c[0], c[3]) for c in CASES], ids=IDS)
def test_cli_refuses_in_one_line(made, case_id, words):
    assert_one_line_refusal(run_cli("inspect", str(made[case_id]), "--json"), words)


def test_rest_refuses_with_problem_json(made, client):
    for case_id, _, code, words in CASES:
        r = upload(client, made[case_id], name=f"{case_id}.bin")
        assert r.status_code == 422, (case_id, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code and words in r.json()["detail"], (case_id, r.json())
    assert client.get("/api/v1/checkpoints").json()["total"] == 0


# --- the protobuf walk is strict both ways -----------------------------------------------------


def test_onnx_and_savedmodel_are_not_confused(made):
    assert sniff(made["savedmodel"]) == "tf_savedmodel"
    for case_id in IDS:
        if case_id.startswith("onnx"):
            assert sniff(made[case_id]) == "onnx", case_id


@pytest.mark.parametrize("header_len", [0x108, 0x1208, 0x120208, 0x7B08, 0x112, 0x7B12])
def test_a_safetensors_file_starting_with_a_protobuf_tag_byte_is_read(tmp_path, header_len):
    """The safetensors length's low byte can be 0x08 or 0x12 (a protobuf tag): still safetensors."""
    tensors = {"w": torch.arange(4, dtype=torch.float32)}
    path = f.save_safetensors(tensors, tmp_path / "x.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].rstrip(b" ")
    padded = header + b" " * (header_len - len(header))  # safetensors allows trailing spaces
    path.write_bytes(struct.pack("<Q", header_len) + padded + raw[8 + n :])
    assert path.read_bytes()[:1] in (b"\x08", b"\x12")
    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors" and [t.name for t in ckpt.tensors] == ["w"]


def test_text_that_starts_like_a_varint_is_not_onnx(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x08\x01\x00\x00garbage" * 20)
    assert sniff(path) == "unknown"
    path.write_bytes(b"\x08\x07\x12\x03\x01\x02\x03" + bytes(100))  # producer_name is not text
    assert sniff(path) == "unknown"


# --- folders of these formats, and the real Keras/h5py when installed ---------------------------


def test_a_savedmodel_folder_is_refused_as_one(tmp_path):
    folder = tmp_path / "export"
    (folder / "variables").mkdir(parents=True)
    saved_model_pb(folder / "saved_model.pb")
    (folder / "fingerprint.pb").write_bytes(b"\x08\x01")
    (folder / "variables" / "variables.index").write_bytes(b"\x00")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)
    assert err.value.code == "tf_savedmodel" and "saved_model.pb" in err.value.message
    assert_one_line_refusal(run_cli("inspect", str(folder)), "TensorFlow SavedModel")


def test_real_keras_files(tmp_path):
    pytest.importorskip("h5py")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "m.keras")
    assert err.value.code == "keras"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path / "m.weights.h5")
    assert err.value.code == "hdf5"
