"""Parse an untrusted file in a child process with memory, CPU and file-size limits.

The readers never execute pickled code, but a parser can still be driven into a crash or into
using too much memory or time. In the child, any of those ends one process and becomes a clean
``CheckpointError``; the server never sees it. An audit hook armed around parsing refuses (and
reports) anything a parser has no business doing: running programs, opening files for writing,
sockets, imports, ``exec``.

Run as ``python -m ckptscope.formats.sandbox`` with a JSON request on stdin; prints a JSON answer.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptscope.errors import CheckpointError

from .model import Checkpoint, checkpoint_from_json, checkpoint_to_json

# the parent's side (``run_sandboxed``) imports logging, signal and subprocess when it runs a child:
# the child, which runs this module, needs none of them
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BLOCKED_EVENTS = (
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.mkdir",
    "os.chmod",
    "os.chown",
    "os.putenv",
    "os.unsetenv",
    "os.truncate",
    "subprocess.Popen",
    "socket.",
    "ctypes.",
    "pty.",
    "shutil.",
    "webbrowser.",
    "urllib.",
    "http.",
    "ftplib.",
    "exec",
    "compile",
    "code.",
    "builtins.input",
    "sys.settrace",
    "sys.setprofile",
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one parse (the values come from ``Settings.parse_limits``)."""

    memory_bytes: int
    cpu_seconds: int
    timeout_s: float


def _arm_audit_hook(violations: list[str]) -> None:
    def hook(event: str, args: tuple[Any, ...]) -> None:
        blocked = event.startswith(BLOCKED_EVENTS)
        if event == "open" and len(args) > 1 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            blocked = True
        if event == "import" and args and args[0] not in sys.modules:
            blocked = True
        if blocked:
            violations.append(event)
            raise PermissionError(f"blocked by ckptscope's parser sandbox: {event}")

    sys.addaudithook(hook)


def _worker() -> int:
    # everything the readers may need is imported before the hook is armed: the text codecs, and
    # the reader modules this request's file is read with (all of them for a folder, a directory,
    # a sharded index or an object store's bytes)
    import collections  # noqa: F401
    import encodings.ascii
    import encodings.cp437
    import encodings.latin_1
    import encodings.utf_8  # noqa: F401

    from . import import_readers, open_checkpoint

    request = json.loads(sys.stdin.read())
    given = request.get("shards")
    shards = None if given is None else {k: Path(v) for k, v in given.items()}
    # a ranged round (ranged.py): the fetched bytes of an object store, opened before the hook
    ranged = None
    if request.get("ranged") is not None:
        from .ranged_sandbox import child_context, trace_json

        ranged = child_context(request["ranged"])
    import_readers(None if request.get("folder") or ranged is not None else request["path"])
    violations: list[str] = []
    _arm_audit_hook(violations)
    try:
        resolve = None if shards is None else shards.get
        folder = shards if request.get("folder") else None  # an uploaded folder: its files by name
        target = request["path"] if ranged is None else ranged.path(request["path"])
        ckpt = open_checkpoint(target, resolve_shard=resolve, name=request.get("name"), folder=folder)  # type: ignore[arg-type]
        answer: dict[str, Any] = {"ok": True, "checkpoint": checkpoint_to_json(ckpt)}
    except CheckpointError as exc:
        answer = {"ok": False, "code": exc.code, "message": exc.message, "extra": exc.extra}
    except MemoryError:
        answer = {"ok": False, "code": "limit_exceeded", "message": "reading the file needs more memory than allowed"}
    except RecursionError:
        answer = {"ok": False, "code": "corrupt", "message": "the file nests too deeply"}
    except Exception:  # open_checkpoint maps readers' errors; this is the last line of defence
        answer = {"ok": False, "code": "parser_crashed", "message": "the parser failed on this file"}
    if ranged is not None:
        answer["ranged"] = trace_json(ranged)
    if violations:
        answer = {
            "ok": False,
            "code": "blocked_operation",
            "message": f"parsing attempted a forbidden operation ({violations[0]}) and was stopped",
        }
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


def _set_limits(limits: Limits) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # the parser writes no file
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setsid()


def open_checkpoint_sandboxed(
    path: str | Path,
    *,
    limits: Limits,
    shards: dict[str, Path] | None = None,
    name: str | None = None,
    folder: bool = False,
) -> Checkpoint:
    # shards: the files a sharded index may name (None: look beside the index, for local files only);
    # folder: shards are an uploaded folder's files, read as a folder (formats/folder.py); a local
    # directory is simply its path
    shard_map = None if shards is None else {k: str(v) for k, v in shards.items()}
    request = {"path": str(path), "name": name, "shards": shard_map, "folder": folder}
    answer = run_sandboxed(request, limits, str(path))
    if not answer.get("ok"):
        raise answer_error(answer)
    return checkpoint_from_json(answer["checkpoint"])


def answer_error(answer: dict[str, Any]) -> CheckpointError:
    """The CheckpointError a child answered."""
    error = CheckpointError(str(answer.get("code")), str(answer.get("message")))
    extra = answer.get("extra")
    if isinstance(extra, dict):
        error.extra.update(extra)
    return error


def run_sandboxed(request: dict[str, Any], limits: Limits, what: str) -> dict[str, Any]:
    """Run one request in the sandboxed child; its JSON answer (``ok`` true or false). A child
    that ran out of time, memory or CPU, crashed or answered nothing is a CheckpointError."""
    import signal
    import subprocess

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    if sys.pycache_prefix:
        # this process reads its bytecode from a cache elsewhere (bench/startup.py's, a source
        # checkout with PYTHONDONTWRITEBYTECODE): the child reads the same, and writes none
        env["PYTHONPYCACHEPREFIX"] = os.path.abspath(sys.pycache_prefix)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ckptscope.formats.sandbox"],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=limits.timeout_s,
            env=env,
            cwd=str(PROJECT_ROOT),
            preexec_fn=lambda: _set_limits(limits),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CheckpointError("limit_exceeded", f"reading the file took longer than {limits.timeout_s:.0f} s") from None
    if proc.returncode < 0:
        sig = -proc.returncode
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            raise CheckpointError("limit_exceeded", "reading the file needs more CPU time than allowed")
        raise CheckpointError("parser_crashed", f"the file crashed the parser (signal {signal.Signals(sig).name})")
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        if "MemoryError" in tail[0]:
            raise CheckpointError("limit_exceeded", "reading the file needs more memory than allowed") from None
        import logging

        log = logging.getLogger("ckptscope.sandbox")
        log.warning("the parser failed on %s: %s", what, tail[0][:500])  # the details stay in the log
        raise CheckpointError("parser_crashed", "the parser failed on this file") from None
    if not isinstance(answer, dict):
        raise CheckpointError("parser_crashed", "the parser failed on this file")
    return answer


if __name__ == "__main__":
    raise SystemExit(_worker())
