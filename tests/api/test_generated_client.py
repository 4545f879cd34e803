"""A typed Python client generated from the served /openapi.json (openapi-python-client) works
against a live server: upload, list, one checkpoint, a page of its tensors, one tensor, a
download and the errors, all through the generated typed models."""

from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from tests import factories as f
from tests.helpers import database_env
from tests.servers import Server

TOKEN = "generated-client-token"
PACKAGE = "ckptscope_client"
# No formatter run over the output; PNG bodies as bytes (the generator only knows octet-stream).
GENERATOR_CONFIG = f"""post_hooks: []
package_name_override: {PACKAGE}
project_name_override: ckptscope-client
content_type_overrides:
  image/png: application/octet-stream
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    srv = Server(root / "data", {"CKPTSCOPE_API_TOKEN": TOKEN, **database_env()})
    try:
        yield srv, root
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client_package(live):
    """The generated package, imported (generated into a temporary directory, never committed)."""
    srv, root = live
    status, document = srv.request("GET", "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    spec = root / "openapi.json"
    spec.write_text(json.dumps(document))
    config = root / "generator.yaml"
    config.write_text(GENERATOR_CONFIG)
    out = root / "generated"
    generator = Path(sys.executable).with_name("openapi-python-client")
    command = [str(generator), "generate", "--path", str(spec), "--output-path", str(out), "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "Warning" not in report and "WARNING" not in report, report  # every operation was generated whole
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def api(module: str):
    return importlib.import_module(f"{PACKAGE}.api.{module}")


def test_generated_client_uploads_lists_and_reads_tensors(live, client_package, tmp_path):
    srv, _ = live
    models = importlib.import_module(f"{PACKAGE}.models")
    types = importlib.import_module(f"{PACKAGE}.types")
    f.seeded(5)
    sd = {"encoder.weight": torch.randn(6, 4), "encoder.bias": torch.randn(6), "head.weight": torch.randn(2, 6)}
    st_path = f.save_safetensors(sd, tmp_path / "model.safetensors")
    pt_path = f.save_torch(sd, tmp_path / "model.pt")
    client = client_package.AuthenticatedClient(base_url=srv.base, token=TOKEN, raise_on_unexpected_status=True)
    with client as c:
        # upload: multipart (a typed form body) and the raw body with ?filename=
        form = models.UploadCheckpointFilesBody(
            file=[types.File(payload=io.BytesIO(st_path.read_bytes()), file_name="model.safetensors")],
            name="typed upload",
        )
        made = api("checkpoints.upload_checkpoint").sync(client=c, body=form)
        assert isinstance(made, models.CheckpointOut), made
        assert made.name == "typed upload" and made.format_ == "safetensors" and made.tensor_count == 3
        assert isinstance(made.created_at, datetime) and made.created_at.tzinfo is not None
        raw = types.File(payload=io.BytesIO(pt_path.read_bytes()), file_name="model.pt")
        made_pt = api("checkpoints.upload_checkpoint").sync(client=c, body=raw, filename="model.pt")
        assert isinstance(made_pt, models.CheckpointOut) and made_pt.format_ == "torch-zip"

        page = api("checkpoints.list_checkpoints").sync(client=c)
        assert isinstance(page, models.CheckpointPageOut)
        assert {item.id for item in page.items} == {made.id, made_pt.id} and page.total == 2
        assert all(isinstance(item, models.CheckpointOut) for item in page.items)

        get_checkpoint = api("checkpoints.get_checkpoint")
        deadline = time.monotonic() + 60
        while (detail := get_checkpoint.sync(made.id, client=c)).stats_state != "done":
            assert time.monotonic() < deadline, detail
            time.sleep(0.05)
        assert isinstance(detail, models.CheckpointDetailOut)
        assert detail.files[0].size == st_path.stat().st_size and isinstance(detail.files[0], models.FileOut)
        assert detail.roots[0].tensor_count == 3

        tensors = api("checkpoints.list_tensors").sync(
            made.id, client=c, sort=models.ListTensorsSort.STD, desc=True, limit=2
        )
        assert isinstance(tensors, models.TensorPageOut) and tensors.total == 3 and len(tensors.tensors) == 2
        stds = [t.stats.std for t in tensors.tensors]
        assert stds == sorted(stds, reverse=True)
        top = tensors.tensors[0]
        assert isinstance(top, models.TensorOut) and isinstance(top.stats, models.StatsOut)
        expected = max(sd, key=lambda k: sd[k].std().item())
        assert top.name == expected and top.shape == list(sd[expected].shape)
        assert top.stats.std == pytest.approx(sd[expected].std().item(), rel=1e-5)

        one = api("checkpoints.get_tensor").sync(made.id, "encoder.weight", client=c)
        assert isinstance(one, models.TensorDetailOut) and one.dtype == "float32" and one.numel == 24
        assert one.stats.max_ == pytest.approx(sd["encoder.weight"].max().item())
        assert len(one.stats.hist) == 64

        blob = api("operations.download_checkpoint").sync(made.id, client=c)
        assert torch.equal(load(blob.payload.read())["head.weight"], sd["head.weight"])

        # errors come back as the typed Problem, with their code
        missing = get_checkpoint.sync("no-such-id", client=c)
        assert isinstance(missing, models.Problem) and missing.code == "not_found" and missing.status == 404
        bad = api("checkpoints.list_tensors").sync(made.id, client=c, limit=0)
        assert isinstance(bad, models.Problem) and bad.code == "validation"
        assert bad.errors[0].loc == ["query", "limit"]

    anonymous = client_package.Client(base_url=srv.base)
    with anonymous as c:
        refused = api("checkpoints.list_checkpoints").sync(client=c)
        assert isinstance(refused, models.Problem) and refused.code == "unauthorized"
