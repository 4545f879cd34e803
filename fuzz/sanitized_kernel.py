"""Build ``ckptscope/stats/_kernel.c`` with AddressSanitizer and UBSan, and load that build.

    python -m fuzz.sanitized_kernel OUTDIR     # builds it there, prints the environment to load it

(``CKPTSCOPE_FUZZ_KERNEL=<module>`` for ``fuzz/fuzz_kernel.py``, then ``sanitizer_env``'s
variables, one ``NAME=VALUE`` a line; exit status 3 when gcc or its libasan is missing.)

The module is compiled like setup.py compiles it (same source, the same
``CKPTSCOPE_KERNEL_SOURCE_SHA256`` define, so ``kernel_engine.load_kernel`` accepts it), but with
``-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g``.
The interpreter is not built with ASan, so a process that loads the module must start with
libasan preloaded (``sanitizer_env``) and with ``PYTHONMALLOC=malloc``: pymalloc serves blocks of
up to 512 bytes (a 64-bin histogram is exactly 512) from its own arenas, where ASan sees no
bounds.

Every UBSan check is on, alignment included: the kernel reads its buffers through ``memcpy``
(file-mapped chunks start at whatever offset the file gives them), which
``test_misaligned_buffers_are_read_without_undefined_behaviour`` checks.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "ckptscope" / "stats" / "_kernel.c"
MODULE = "ckptscope.stats._kernel"

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
# what setup.py adds that changes the code's meaning (the omp simd pragmas, no errno from libm)
SEMANTICS = ["-fopenmp-simd", "-fno-math-errno"]
KNOWN_UB: list[str] = []  # UBSan checks left out (none: see the module docstring)

ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def find_gcc() -> str | None:
    return shutil.which("gcc")


def find_libasan(gcc: str) -> Path | None:
    """gcc's shared ASan runtime, or None (``-print-file-name`` echoes the bare name when it has none)."""
    out = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False)
    path = Path(out.stdout.strip())
    return path.resolve() if path.is_absolute() and path.exists() else None


def source_sha256(source: Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def build(
    outdir: Path,
    source: Path = SOURCE,
    *,
    sha256: str | None = None,
    extra_flags: list[str] | None = None,
    gcc: str | None = None,
) -> Path:
    """Compile ``source`` into ``outdir/_kernel<EXT_SUFFIX>``. ``sha256`` is the define's value
    (default: the sha256 of the real ``_kernel.c``, as setup.py computes it, even for a modified
    copy, so the engine accepts the build); ``extra_flags`` replace ``KNOWN_UB``."""
    gcc = gcc or find_gcc()
    if gcc is None:
        raise RuntimeError("gcc not found")
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / f"_kernel{sysconfig.get_config_var('EXT_SUFFIX')}"
    define = f'-DCKPTSCOPE_KERNEL_SOURCE_SHA256="{sha256 or source_sha256()}"'
    command = [
        gcc,
        "-shared",
        "-fPIC",
        *SANITIZE,
        *SEMANTICS,
        *(KNOWN_UB if extra_flags is None else extra_flags),
        define,
        f"-I{sysconfig.get_paths()['include']}",
        str(source),
        "-o",
        str(target),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return target


def load(path: Path) -> ModuleType:
    """Load the extension at ``path`` as ``ckptscope.stats._kernel`` (before anything imports the
    installed one; ``importlib.import_module`` then returns this one)."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE] = module
    import ckptscope.stats

    ckptscope.stats._kernel = module  # type: ignore[attr-defined]
    return module


def sanitizer_env(libasan: Path, log_path: Path | None = None) -> dict[str, str]:
    """Environment for a Python process that loads a sanitized build. ``log_path``: write the
    reports to ``<log_path>.<pid>`` instead of stderr (pytest captures fd 2 and loses a report
    printed just before the process aborts)."""
    log = f":log_path={log_path}" if log_path is not None else ""
    return {
        "LD_PRELOAD": str(libasan),
        "ASAN_OPTIONS": ASAN_OPTIONS + log,
        "UBSAN_OPTIONS": UBSAN_OPTIONS + log,
        "PYTHONMALLOC": "malloc",
    }


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    gcc = find_gcc()
    libasan = find_libasan(gcc) if gcc else None
    if gcc is None or libasan is None:
        sys.stderr.write("gcc or its libasan is missing: no sanitized kernel\n")
        return 3
    target = build(Path(sys.argv[1]), gcc=gcc)
    env = {"CKPTSCOPE_FUZZ_KERNEL": str(target)} | sanitizer_env(libasan)
    sys.stdout.write("".join(f"{k}={v}\n" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
