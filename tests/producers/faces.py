"""Each public face's answer for one producer's file, computed once per session (``memo``):
the library (parsed in the sandbox, as the CLI and the server do), the CLI (``inspect --json``) and
REST (upload, then the checkpoint, its tensors and its tree). A refusal fails the test that asked,
with the refusal's own words."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from typing import Any

import pytest

from ckptscope.errors import CkptscopeError
from tests.helpers import wait_stats
from tests.producers.truth import Case


def _memoized(memo: dict, key: tuple[str, str], compute: Any) -> Any:
    if key not in memo:
        try:
            memo[key] = ("ok", compute())
        except CkptscopeError as exc:
            memo[key] = ("failed", f"refused: {exc.code}: {exc.message}")
        except _Failure as exc:
            memo[key] = ("failed", str(exc))
    status, value = memo[key]
    if status == "failed":
        pytest.fail(f"{key[1]} via {key[0]}: {value}", pytrace=False)
    return value


class _Failure(Exception):
    pass


def sandbox_listing(case: Case, memo: dict):
    """The listing as the library gives it, parsed in the sandbox (a fresh child process)."""
    from ckptscope.config import Settings
    from ckptscope.formats.sandbox import open_checkpoint_sandboxed

    return _memoized(
        memo,
        ("library", case.id),
        lambda: open_checkpoint_sandboxed(case.path, limits=Settings().parse_limits, shards=None),
    )


def library_records(ckpt: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "dtype": t.shown_dtype,
            "shape": list(t.shape),
            "alias_of": t.alias_of,
            "kind": t.kind,
            "kind_source": t.kind_source,
        }
        for t in ckpt.tensors
    ]


def library_stats(case: Case, memo: dict) -> dict[str, dict[str, Any]]:
    def compute() -> dict[str, dict[str, Any]]:
        from ckptscope.stats.engine import compute_stats

        ckpt = sandbox_listing(case, memo)
        return {name: s.to_json() for name, s in compute_stats(ckpt.tensors).items()}

    return _memoized(memo, ("library stats", case.id), compute)


def cli_inspect(case: Case, memo: dict, *args: str) -> dict[str, Any]:
    """``ckptscope inspect PATH --json`` (the whole file unless ``args`` say otherwise), through
    the CLI's entry point in this process; the parse itself runs in the sandbox child."""

    def compute() -> dict[str, Any]:
        from ckptscope import cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["inspect", str(case.path), "--json", *(args or ("--root", ""))])
        if rc != 0:
            raise _Failure(f"exit {rc}: {err.getvalue().strip()}")
        return json.loads(out.getvalue(), parse_constant=_refuse_constant)

    return _memoized(memo, ("cli" + " ".join(args), case.id), compute)


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"JSON carried a {name} literal")


@dataclass
class RestView:
    created: dict[str, Any]
    detail: dict[str, Any]
    tensors: list[dict[str, Any]]  # the whole file (root "")
    default_tensors: dict[str, Any]  # the default root's page
    tree: dict[str, Any]  # the whole file's tree
    one: dict[str, dict[str, Any]]  # GET .../tensors/{name} for a few names


def rest_view(case: Case, api: Any, memo: dict) -> RestView:
    def compute() -> RestView:
        files = [("file", (p.name, p.read_bytes())) for p in case.uploads]
        r = api.post("/api/v1/checkpoints", files=files)
        if r.status_code != 201:
            raise _Failure(f"upload answered {r.status_code}: {r.text[:300]}")
        created = r.json()
        cid = created["id"]
        detail = wait_stats(api, cid, timeout=60)
        if detail["stats_state"] != "done":
            raise _Failure(f"stats {detail['stats_state']}: {detail.get('stats_error')}")
        page = _get(api, f"/api/v1/checkpoints/{cid}/tensors", root="", limit=5000)
        default = _get(api, f"/api/v1/checkpoints/{cid}/tensors", limit=5000)
        tree = _get(api, f"/api/v1/checkpoints/{cid}/tree", root="")["tree"]
        sample = _sample_names(case)
        one = {name: _get(api, f"/api/v1/checkpoints/{cid}/tensors/{name}", root="") for name in sample}
        return RestView(created, detail, page["tensors"], default, tree, one)

    return _memoized(memo, ("rest", case.id), compute)


def _get(api: Any, url: str, **params: Any) -> dict[str, Any]:
    r = api.get(url, params=params)
    if r.status_code != 200:
        raise _Failure(f"GET {url} answered {r.status_code}: {r.text[:300]}")
    return json.loads(r.text, parse_constant=_refuse_constant)


def _sample_names(case: Case) -> list[str]:
    """The first tensor, the first buffer and the first alias (where there are such)."""
    names = list(case.expected)
    picks = [names[0]]
    for test in (lambda e: e.kind == "buffer", lambda e: e.alias_of is not None):
        found = next((n for n, e in case.expected.items() if test(e)), None)
        if found and found not in picks:
            picks.append(found)
    return picks
