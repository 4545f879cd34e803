"""The C kernel built with AddressSanitizer and UBSan (``fuzz/sanitized_kernel.py``) runs the kernel
tests: ``test_kernel_safety.py`` and the kernel-engine cases of ``test_engines.py`` (``-k kernel``),
in a child process with libasan preloaded and the sanitized build installed as
``ckptscope.stats._kernel`` (by a ``-p`` plugin, before anything imports ckptscope). Any
out-of-bounds access or undefined behaviour in the kernel aborts the child with a report.

A positive control builds the same source with one out-of-bounds write added (a byte written past
the end of every buffer the kernel releases) and checks that the same run catches it. Skipped only
where gcc or its libasan is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuzz import sanitized_kernel as sk

ROOT = Path(__file__).resolve().parents[2]
GCC = sk.find_gcc()
LIBASAN = sk.find_libasan(GCC) if GCC else None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GCC is None or LIBASAN is None, reason="gcc or its libasan (gcc -print-file-name) is missing"),
]

PLUGIN = '''
"""Installs the sanitized kernel before ckptscope is imported, counts its calls, and reports
which kernel module the session used."""
import json
import os
import sys
from pathlib import Path

from fuzz.sanitized_kernel import load

kernel = load(Path(os.environ["CKPTSCOPE_SANITIZED_KERNEL"]))
calls = {"pass1": 0, "pass2": 0}
outcomes = {"passed": 0, "failed": 0, "skipped": []}


def _counted(name):
    real = getattr(kernel, name)

    def call(*args):
        calls[name] += 1
        return real(*args)

    return call


kernel.pass1 = _counted("pass1")
kernel.pass2 = _counted("pass2")


def pytest_runtest_logreport(report):
    if report.skipped:
        outcomes["skipped"].append(f"{report.nodeid}: {report.longrepr}")
    elif report.when == "call" or report.failed:
        outcomes["passed" if report.passed else "failed"] += 1


def pytest_sessionfinish(session, exitstatus):
    from ckptscope.stats.kernel_engine import load_kernel

    used, why = load_kernel()
    report = {
        "installed": sys.modules["ckptscope.stats._kernel"].__file__,
        "engine": getattr(used, "__file__", None),
        "why": why,
        "calls": calls,
        "outcomes": outcomes,
    }
    Path(os.environ["CKPTSCOPE_SANITIZER_REPORT"]).write_text(json.dumps(report))
'''


def run_kernel_tests(built: Path, tmp: Path, tests: list[str]) -> tuple[subprocess.CompletedProcess[str], str, dict]:
    """pytest on ``tests`` with ``built`` as the kernel; returns the run, the sanitizer reports
    (written to files: pytest captures fd 2, so one printed just before an abort is lost) and the
    plugin's report."""
    (tmp / "sanitized_kernel_plugin.py").write_text(PLUGIN)
    logs, report = tmp / "sanitizer", tmp / "report.json"
    assert LIBASAN is not None
    env = os.environ | sk.sanitizer_env(LIBASAN, log_path=logs)
    env |= {
        "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "CKPTSCOPE_SANITIZED_KERNEL": str(built),
        "CKPTSCOPE_SANITIZER_REPORT": str(report),
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sanitized_kernel_plugin", *tests]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    reports = "\n".join(p.read_text(errors="replace") for p in sorted(tmp.glob("sanitizer.*")))
    return done, reports, json.loads(report.read_text()) if report.exists() else {}


KERNEL_TESTS = [
    "tests/stats/test_kernel_safety.py",
    "tests/stats/test_kernel_dtypes.py",  # every dtype's loops, tails and checking loops
    "tests/stats/test_engines.py",
    "-k",
    "kernel",  # every test of the two kernel files (their module names match), the engines' kernel cases
]


def test_kernel_tests_pass_under_asan_and_ubsan(tmp_path):
    built = sk.build(tmp_path / "build")
    done, reports, report = run_kernel_tests(built, tmp_path, KERNEL_TESTS)
    assert done.returncode == 0 and not reports, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}\n{reports[:6000]}"
    # the sanitized build was the module in use, the engine took it, and it ran
    assert report["installed"] == str(built) and report["engine"] == str(built), report
    assert report["calls"]["pass1"] >= 20 and report["calls"]["pass2"] >= 20, report["calls"]
    assert report["outcomes"]["failed"] == 0 and report["outcomes"]["passed"] >= 40, report["outcomes"]
    assert not [s for s in report["outcomes"]["skipped"] if "kernel" in s.lower()], report["outcomes"]["skipped"]


def test_the_sanitized_run_catches_an_out_of_bounds_write(tmp_path):
    """Positive control: the kernel's own source, included after a macro that makes every
    ``PyBuffer_Release`` first write 256 bytes past the end of the buffer (past any slack an
    array keeps, into the allocation's red zone: PYTHONMALLOC=malloc puts every buffer there)."""
    broken = tmp_path / "broken_kernel.c"
    broken.write_text(
        textwrap.dedent(
            f"""\
            #define PY_SSIZE_T_CLEAN
            #include <Python.h>
            #include <string.h>
            #define PyBuffer_Release(view) (memset((char *)(view)->buf + (view)->len, 1, 256), PyBuffer_Release(view))
            #include "{sk.SOURCE}"
            """
        )
    )
    built = sk.build(tmp_path / "build", broken)
    done, reports, report = run_kernel_tests(built, tmp_path, ["tests/stats/test_kernel_safety.py"])
    assert done.returncode != 0, done.stdout[-3000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in reports, (done.stdout[-3000:], reports[:3000])
    assert "kernel_pass" in reports, reports[:3000]  # the write is the kernel's


def test_misaligned_buffers_are_read_without_undefined_behaviour(tmp_path):
    built = sk.build(tmp_path / "build", extra_flags=[])  # every UBSan check, alignment included
    assert LIBASAN is not None
    code = textwrap.dedent(
        f"""\
        from array import array
        from pathlib import Path
        from fuzz.sanitized_kernel import load

        kernel = load(Path({str(built)!r}))
        raw = bytearray(1) + array("f", [1.0, 2.0, 3.0, 4.0]).tobytes()  # float32 at an odd address
        kernel.pass1(memoryview(raw)[1:], 4, False, array("q", bytes(8 * 65536)))
        lut = bytearray(65536)
        lut[0xBF80] = 1  # the key bin of 1.0: collected, then counted
        hist = array("q", bytes(512))
        out = memoryview(bytearray(21))[1:]  # the collected values are stored at an odd address too
        *_, got = kernel.pass2(
            memoryview(raw)[1:], 4, False, False, 2.5, 1.0, 16.0, hist, bytes(lut), out, 0, bytearray()
        )
        assert got == 1 and array("f", out[:4].tobytes()).tolist() == [1.0], (got, out.tobytes())
        sub = array("q", bytes(8 * 65536))
        kernel.pass2(memoryview(raw)[1:], 4, False, True, 2.5, 1.0, 16.0, hist, bytes(lut), bytearray(), 0, sub)
        assert sub[0] == 1 and sum(sub) == 1  # 1.0's key 0xBF800000: its next 16 bits are 0
        # every stored width at an odd address: bfloat16 (code 3), float16 (2), int64 (12), bool (14)
        for code, item, values in ((3, 2, b"\\x80\\x3f" * 40), (2, 2, b"\\x00\\x3c" * 40), (12, 8, bytes(8) * 40),
                                   (14, 1, b"\\x01" * 40)):
            raw = memoryview(bytearray(1) + values)[1:]
            finite, *_ = kernel.pass1(raw, 40, code, array("q", bytes(8 * 65536)))
            kernel.pass1(raw, 40, code, bytearray())
            kernel.pass2(raw, 40, code, False, 0.5, 0.0, 1.0, hist, b"", bytearray(), 0, bytearray())
            width = 8 if code in (12, 14) else 4
            out = memoryview(bytearray(40 * width + 1))[1:]
            kernel.convert(raw, 40, code, out)
            assert finite == 40 and len(out) == 40 * width
        """
    )
    env = os.environ | sk.sanitizer_env(LIBASAN, log_path=tmp_path / "sanitizer") | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    reports = "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("sanitizer.*")))
    assert done.returncode == 0 and not reports, reports[:3000] or done.stderr[-3000:]
