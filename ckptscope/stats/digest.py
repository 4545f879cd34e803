"""Content digests: ``xxh3-128`` of a tensor's dtype, shape and logical bytes in C order, so the same
tensor has the same digest in any file, format or layout (a transposed view hashes its values in
row-major order, not its storage's order).

xxh3 is a fast non-cryptographic hash (tens of GB/s): it is computed in the stats pass over bytes
the pass reads anyway. It identifies content for comparison (which tensors and modules are
identical to which); it is not a security boundary against someone who crafts collisions on
purpose: a copy is verified against the bytes it wrote, not only their digests.

What is hashed after the header: a plain tensor's elements in its own dtype; a stitched tensor's
(torch.distributed.checkpoint) elements assembled in C order; a torch quantized tensor's
dequantized float32 values (its scheme and parameters are in the header); a GGUF-encoded tensor's
blocks as stored (its type is in the header).
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator
from functools import lru_cache

import xxhash

from ckptscope.formats.model import TensorInfo
from ckptscope.formats.writers import OutputTensor, iter_tensor_bytes

PREFIX = "xxh3-128:"
READ_BYTES = 1 << 20


def is_digest(text: str) -> bool:
    """Whether ``text`` is a digest as ``TensorStats.digest`` spells it."""
    hexpart = text[len(PREFIX) :]
    return text.startswith(PREFIX) and len(hexpart) == 32 and all(c in "0123456789abcdef" for c in hexpart)


def header(info: TensorInfo) -> bytes:
    quant = None if info.quant is None else json.dumps(info.quant.describe(), sort_keys=True)
    return _header(info.dtype, info.shown_dtype, info.shape, quant, info.encoding)


@lru_cache(maxsize=4096)
def _header(dtype: str, shown_dtype: str, shape: tuple[int, ...], quant: str | None, encoding: str | None) -> bytes:
    # the element type: a file's own name for it only where the bytes are not plain elements (a
    # GGUF F32 tensor is float32 like any other; a Q4_K one is its blocks)
    element = dtype if encoding is None and quant is None else shown_dtype
    parts: dict[str, object] = {"dtype": element, "shape": list(shape)}
    if quant is not None:
        parts["quantization"] = json.loads(quant)
    if encoding is not None:
        parts["encoding"] = encoding
    return b"ckptscope-tensor-1\0" + json.dumps(parts, sort_keys=True, separators=(",", ":")).encode() + b"\0"


def new_digester(info: TensorInfo) -> xxhash.xxh3_128:
    digester = xxhash.xxh3_128()
    digester.update(header(info))
    return digester


def finish(digester: xxhash.xxh3_128) -> str:
    return PREFIX + digester.hexdigest()


def digest_of_bytes(info: TensorInfo, data: bytes | memoryview) -> str:
    """The digest of a tensor whose logical bytes are ``data`` (a plain C-order range)."""
    digester = new_digester(info)
    digester.update(data)
    return finish(digester)


def tensor_digest(info: TensorInfo) -> str:
    """The digest of one tensor, reading its bytes (outside a stats pass)."""
    digester = new_digester(info)
    for part in _logical_bytes(info):
        digester.update(part)
    return finish(digester)


def _logical_bytes(info: TensorInfo) -> Iterator[bytes | memoryview]:
    if info.encoding is not None:  # the blocks as stored
        if info.storage.nbytes == 0:
            return
        with open(info.storage.path, "rb") as fh:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                start, end = info.storage.offset, info.storage.offset + info.storage.nbytes
                for at in range(start, end, READ_BYTES):
                    yield bytes(mm[at : min(at + READ_BYTES, end)])
        return
    yield from iter_tensor_bytes(OutputTensor(info.name, info))
