"""What the globals a pickle names mean for safety: the one reviewed place.

Nothing a pickle names is ever imported or called here (the pickle is read as an inert graph,
``pickle_graph``). These tables answer two other questions about each global:

- ``dangerous``: could it run code, touch files, the network or the process when the file is
  loaded with ``torch.load(weights_only=False)`` (or plain ``pickle.load``)? Such a file is
  refused (``unsafe_pickle``), naming the global, so that nobody is tempted to load it unsafely.
  Every other global (an unknown class, a dataclass, a config object, numpy data) is read as
  inert data.
- ``weights_only_allowed``: would ``torch.load(weights_only=True)`` on torch >= 2.10 accept it
  without ``torch.serialization.add_safe_globals``? (torch's ``_get_allowed_globals``; the test
  suite checks the table against the installed torch.)

Each entry of ``DANGEROUS_MODULES`` and ``DANGEROUS_NAMES`` has its own test
(tests/formats/test_pickle_globals.py).
"""

from __future__ import annotations

# Whole modules (and their submodules) whose globals can run code, open files or sockets, spawn
# processes or threads, load other pickles or code: (module prefix, what it can do).
DANGEROUS_MODULES: dict[str, str] = {
    "os": "runs commands and touches files",
    "posix": "runs commands and touches files",
    "nt": "runs commands and touches files",
    "sys": "reaches the interpreter",
    "subprocess": "runs commands",
    "pty": "runs commands",
    "commands": "runs commands",
    "popen2": "runs commands",
    "platform": "runs commands",
    "webbrowser": "runs programs",
    "importlib": "imports code",
    "imp": "imports code",
    "zipimport": "imports code",
    "runpy": "runs code",
    "pkgutil": "imports code",
    "code": "runs code",
    "codeop": "compiles code",
    "pydoc": "imports code",
    "timeit": "runs code",
    "cProfile": "runs code",
    "profile": "runs code",
    "pdb": "runs code",
    "bdb": "runs code",
    "trace": "runs code",
    "site": "imports code",
    "pickle": "loads another pickle",
    "_pickle": "loads another pickle",
    "pickletools": "reads pickles",
    "marshal": "loads code objects",
    "shelve": "loads pickles from files",
    "dill": "loads another pickle",
    "cloudpickle": "loads another pickle",
    "joblib": "loads pickles from files",
    "ctypes": "calls native code",
    "_ctypes": "calls native code",
    "cffi": "calls native code",
    "socket": "opens network connections",
    "_socket": "opens network connections",
    "ssl": "opens network connections",
    "http": "opens network connections",
    "urllib": "opens network connections",
    "urllib2": "opens network connections",
    "urllib3": "opens network connections",
    "requests": "opens network connections",
    "httpx": "opens network connections",
    "ftplib": "opens network connections",
    "smtplib": "opens network connections",
    "telnetlib": "opens network connections",
    "xmlrpc": "opens network connections",
    "asyncio": "runs coroutines and processes",
    "shutil": "copies and deletes files",
    "tempfile": "creates files",
    "io": "opens files",
    "_io": "opens files",
    "fileinput": "opens files",
    "glob": "lists files",
    "linecache": "reads files",
    "logging": "opens files and sockets (handlers)",
    "multiprocessing": "starts processes",
    "concurrent": "starts processes and threads",
    "threading": "starts threads",
    "_thread": "starts threads",
    "signal": "changes signal handlers",
    "operator": "combines calls (attrgetter, methodcaller)",
    "_operator": "combines calls (attrgetter, methodcaller)",
    "distutils": "runs build commands",
    "setuptools": "runs build commands",
    "pip": "installs packages",
    "torch.hub": "downloads and runs code",
    "torch.jit": "compiles and runs TorchScript",
    "torch._inductor": "compiles and runs code",
    "torch._dynamo": "compiles and runs code",
    "torch.utils.cpp_extension": "compiles and loads native code",
    "torch.serialization": "loads other files",
    "torch.package": "imports packaged code",
    "torch.ops": "calls registered operators",
    "torch.classes": "calls registered classes",
    "torch.library": "registers operators",
    "torch._C": "reaches torch's native bindings",
    "torch.multiprocessing": "starts processes",
    "numpy.testing": "runs code",
    "numpy.f2py": "compiles and runs code",
    "numpy.distutils": "runs build commands",
    "numpy.ctypeslib": "calls native code",
    "numpy.lib.npyio": "loads files (and pickles)",
    "numpy.lib.format": "loads files (and pickles)",
}

# Single globals in modules that are otherwise harmless data.
DANGEROUS_NAMES: dict[tuple[str, str], str] = {
    **{
        (module, name): "runs code or reaches the interpreter"
        for module in ("builtins", "__builtin__")
        for name in (
            "eval",
            "exec",
            "execfile",
            "compile",
            "open",
            "file",
            "input",
            "raw_input",
            "getattr",
            "setattr",
            "delattr",
            "__import__",
            "breakpoint",
            "globals",
            "locals",
            "vars",
            "help",
            "exit",
            "quit",
            "apply",
            "reload",
        )
    },
    ("functools", "partial"): "combines calls",
    ("functools", "reduce"): "combines calls",
    ("functools", "partialmethod"): "combines calls",
    ("functools", "wraps"): "combines calls",
    ("_functools", "partial"): "combines calls",
    ("_functools", "reduce"): "combines calls",
    ("types", "CodeType"): "builds code objects",
    ("types", "FunctionType"): "builds functions",
    ("types", "LambdaType"): "builds functions",
    ("types", "MethodType"): "binds methods",
    ("types", "BuiltinFunctionType"): "binds builtins",
    ("types", "ModuleType"): "builds modules",
    ("copyreg", "_reconstructor_unsafe"): "runs code",
    ("torch", "load"): "loads another file (unsafely, if asked)",
    ("torch", "compile"): "compiles and runs code",
    ("torch", "from_file"): "maps a file",
    ("numpy", "load"): "loads files (and pickles)",
    ("numpy", "loadtxt"): "loads files",
    ("numpy", "genfromtxt"): "loads files",
    ("numpy", "fromfile"): "reads files",
    ("numpy", "memmap"): "maps files",
    ("numpy", "save"): "writes files",
    ("numpy", "savez"): "writes files",
    ("numpy", "savetxt"): "writes files",
    ("numpy", "tofile"): "writes files",
    ("numpy", "frompyfunc"): "wraps callables",
    ("numpy", "vectorize"): "wraps callables",
    ("numpy", "piecewise"): "calls callables",
    ("numpy", "apply_along_axis"): "calls callables",
    ("numpy", "apply_over_axes"): "calls callables",
}


def dangerous(module: str, name: str) -> str | None:
    """What the global could do when loaded unsafely, or None when it is not known to do harm."""
    known = DANGEROUS_NAMES.get((module, name))
    if known is not None:
        return known
    probe = module
    while probe:
        why = DANGEROUS_MODULES.get(probe)
        if why is not None:
            return why
        probe = probe.rpartition(".")[0]
    if name.startswith("__") and name.endswith("__") and name not in ("__newobj__", "__newobj_ex__"):
        return "reaches a dunder attribute"
    return None


# --- torch.load(weights_only=True) ---------------------------------------------------------------

_DTYPE_NAMES = (
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 float32 "
    "float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu "
    "int1 int16 int2 int3 int32 int4 int5 int6 int64 int7 int8 qint32 qint8 quint2x4 quint4x2 quint8 "
    "uint1 uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 uint8"
).split()
_QSCHEMES = (
    "per_channel_affine per_channel_affine_float_qparams per_channel_symmetric per_tensor_affine per_tensor_symmetric"
).split()
_DENSE_TENSOR_TYPES = "BFloat16 Bool Byte Char Double Float Half Int Long Short".split()
_SPARSE_TENSOR_TYPES = "BFloat16 Byte Char Double Float Half Int Long Short".split()
_STORAGE_TYPES = "BFloat16 Bool Byte Char ComplexDouble ComplexFloat Double Float Half Int Long Short".split()
_QUANTIZED_STORAGE_TYPES = "QInt32 QInt8 QUInt2x4 QUInt4x2 QUInt8".split()
_REBUILD_FUNCTIONS = (
    "_rebuild_parameter _rebuild_parameter_with_state _rebuild_qtensor _rebuild_tensor _rebuild_tensor_v2 "
    "_rebuild_tensor_v3 _rebuild_sparse_tensor _rebuild_meta_tensor_no_storage _rebuild_nested_tensor "
    "_rebuild_wrapper_subclass _rebuild_device_tensor_from_numpy _rebuild_device_tensor_from_cpu_tensor"
).split()


def _weights_only_globals() -> frozenset[str]:
    names = {
        "collections.OrderedDict",
        "collections.Counter",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "_codecs.encode",
        "builtins.bytearray",
        "builtins.set",
        "builtins.complex",
        "torch._tensor._rebuild_from_type_v2",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
    }
    names.update(f"torch.{d}" for d in _DTYPE_NAMES)
    names.update(f"torch.{q}" for q in _QSCHEMES)
    names.update(f"torch._utils.{f}" for f in _REBUILD_FUNCTIONS)
    for prefix in ("torch", "torch.cuda"):
        names.update(f"{prefix}.{t}Tensor" for t in _DENSE_TENSOR_TYPES)
        names.update(f"{prefix}.sparse.{t}Tensor" for t in _SPARSE_TENSOR_TYPES)
        names.update(f"{prefix}.{s}Storage" for s in _STORAGE_TYPES)
    names.update(f"torch.{s}Storage" for s in _QUANTIZED_STORAGE_TYPES)
    return frozenset(names)


WEIGHTS_ONLY_GLOBALS = _weights_only_globals()
WEIGHTS_ONLY_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})  # never allowed, even if listed


def weights_only_allowed(qualname: str) -> bool:
    """Would ``torch.load(weights_only=True)`` accept this global without an added safe global?"""
    return qualname in WEIGHTS_ONLY_GLOBALS
