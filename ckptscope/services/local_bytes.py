"""Tensor bytes for the operations that read values the way local files are read (previews,
values, spectra, diffs, copies, exports): uploads and referenced local files as they are; a
referenced bucket's storages copied once into the data directory's ``tmp/`` for the duration of
the operation (``stats.localized``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from ckptscope.formats.model import TensorInfo
from ckptscope.formats.writers import OutputTensor
from ckptscope.stats.localized import localized

if TYPE_CHECKING:
    from ckptscope.core import Core


@contextmanager
def local_tensors(core: Core, content_keys: Sequence[str], tensors: Sequence[TensorInfo]) -> Iterator[list[TensorInfo]]:
    """``tensors`` (of the contents ``content_keys``) readable as local files inside the block."""
    reader = core.range_reader(*content_keys)
    if not reader.remote:
        yield list(tensors)
        return
    with localized(tensors, reader, str(core.blobs.tmp_dir)) as local:
        yield local


@contextmanager
def local_tensor(core: Core, content_key: str, info: TensorInfo) -> Iterator[TensorInfo]:
    with local_tensors(core, [content_key], [info]) as local:
        yield local[0]


@contextmanager
def local_outputs(
    core: Core, content_keys: Sequence[str], outputs: Sequence[OutputTensor]
) -> Iterator[list[OutputTensor]]:
    """The outputs of an export or a copy with their sources readable as local files."""
    with local_tensors(core, content_keys, [o.source for o in outputs]) as sources:
        yield [replace(o, source=s) for o, s in zip(outputs, sources, strict=True)]
