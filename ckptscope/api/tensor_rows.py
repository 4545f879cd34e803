"""A page of tensors (``GET /checkpoints/{id}/tensors``) as JSON text written straight from the
catalogue's columns.

A 5,000-row page is ~5 MB of JSON, most of it each row's histogram and percentiles, which the
catalogue already holds as JSON text (``TensorRow.hist``, written by ``save_stats``). Parsing that
text into records and encoding the records again is what made a page take hundreds of
milliseconds; here a row's JSON is assembled from its columns and the stored fragments are copied
as they are. The record is the one ``tensor_record`` and ``TensorStats.to_json`` define (same
fields, same order, same values): a row whose stored text is not in the layout ``save_stats``
writes (an older catalogue's, a quantized tensor's, a tensor judged at read time) goes through
those functions instead, and the tests compare both paths row by row.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from ckptscope.formats.model import DTYPES, contiguous_stride, module_types_under, relative_name
from ckptscope.services import insights as insights_svc
from ckptscope.services.inspect import parameter_of, tensor_record
from ckptscope.stats.model import STATISTICS, finite_or_none
from ckptscope.store.catalogue import Content, StatsState
from ckptscope.store.queries import CatalogueQueries, TensorColumns, int_tuple, row_to_stats

_string = json.encoder.encode_basestring  # a JSON string literal, non-ASCII kept (as the responses are)
_INIT_PREFIXES = tuple(f'{{"verdict":"{v}","matches":' for v in ("init", "trained", "unknown"))
_DECLARED = tuple((s.name, s.is_float) for s in STATISTICS)


def page_json(
    queries: CatalogueQueries, content: Content, root: str, *, head: Mapping[str, Any], **query: Any
) -> bytes:
    """The page's JSON: ``root``, the ``total`` matching ``query`` (``CatalogueQueries.tensor_rows``),
    ``head`` (offset, limit, stats_state), then ``tensors``: the page's rows as
    ``tensor_record`` with ``stats`` and ``init``. Once a content's stats are done its rows never
    change, so each row's JSON is kept (``ROWS``) and a later page, in any order or filter, reads
    only the positions of its rows."""
    param_of, types = content.param_of, module_types_under(content.module_types or {}, root)
    if content.stats_state != StatsState.DONE:
        ROWS.forget(content.key)  # stats on their way again: what was kept may be outdated
        total, rows = queries.tensor_rows(content, root, **query)
        texts = [_row_json(queries, r, root, param_of, types) for r in rows]
    else:
        total, positions = queries.tensor_positions(content, root, **query)
        kept = ROWS.get(content.key, root, positions)
        missing = [p for p, text in zip(positions, kept, strict=True) if text is None]
        made = {
            r["position"]: _row_json(queries, r, root, param_of, types)
            for r in (queries.tensor_rows_at(content, missing) if missing else ())
        }
        ROWS.put(content.key, root, made)
        texts = [text if text is not None else made[p] for p, text in zip(positions, kept, strict=True)]
    fields = {"root": root, "total": total} | {k: v for k, v in head.items() if k != "root"}
    return (_dumps(fields)[:-1] + ',"tensors":[' + ",".join(texts) + "]}").encode()


class RowCache:
    """The JSON of finished contents' tensor rows, by (content, root) and position; whole contents
    are dropped, least recently used first, to keep ``budget`` characters at most."""

    def __init__(self, budget: int = 64 << 20) -> None:
        self._budget = budget
        self._size = 0
        self._rows: OrderedDict[tuple[str, str], dict[int, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, content_key: str, root: str, positions: Sequence[int]) -> list[str | None]:
        with self._lock:
            rows = self._rows.get((content_key, root))
            if rows is None:
                return [None] * len(positions)
            self._rows.move_to_end((content_key, root))
            return [rows.get(p) for p in positions]

    def put(self, content_key: str, root: str, made: Mapping[int, str]) -> None:
        if not made:
            return
        with self._lock:
            rows = self._rows.setdefault((content_key, root), {})
            self._rows.move_to_end((content_key, root))
            for position, text in made.items():
                old = rows.get(position)
                self._size += len(text) - (len(old) if old is not None else 0)
                rows[position] = text
            while self._size > self._budget and self._rows:
                _, dropped = self._rows.popitem(last=False)
                self._size -= sum(len(t) for t in dropped.values())

    def forget(self, content_key: str) -> None:
        """Drop every root's rows of a content (its stats are being computed again)."""
        with self._lock:
            for key in [k for k in self._rows if k[0] == content_key]:
                self._size -= sum(len(t) for t in self._rows.pop(key).values())

    def held(self, content_key: str) -> int:
        """How many rows of a content are kept (all roots)."""
        with self._lock:
            return sum(len(rows) for key, rows in self._rows.items() if key[0] == content_key)


ROWS = RowCache()


def _dumps(value: Any) -> str:
    """As Starlette's ``JSONResponse`` writes a body."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _row_json(
    queries: CatalogueQueries,
    row: TensorColumns,
    root: str,
    param_of: Mapping[str, str] | None,
    types: Mapping[str, str],
) -> str:
    stats = _stats_json(row) if row["hist"] is not None else "null"
    init = _init_json(row["init"]) if row["hist"] is not None else "null"
    if row["quant"] is not None or stats is None or init is None:
        return _record_json(queries, row, root, param_of, types)
    name = relative_name(row["name"], root) or row["name"]
    alias = relative_name(row["alias_of"], root) if row["alias_of"] else None
    parameter = parameter_of(param_of, root, name)
    offset = row["storage_byte_offset"] + (
        row["storage_offset"] * DTYPES[row["dtype"]].itemsize if row["storage_offset"] else 0
    )
    return (
        f'{{"name":{_string(name)},"dtype":{_string(row["file_dtype"] or row["dtype"])},"shape":{row["shape"]},'
        f'"numel":{int(row["numel"])},"nbytes":{int(row["nbytes"])},"kind":{_string(row["kind"])},'
        f'"kind_source":{_string(row["kind_source"])},"quantization":null,'
        f'"alias_of":{"null" if alias is None else _string(alias)},'
        f'"parameter":{"null" if parameter is None else _string(parameter)},'
        f'"contiguous":{"true" if int_tuple(row["stride"]) == _contiguous(row["shape"]) else "false"},'
        f'"data_offset":{int(offset)},"stats":{stats},"init":{init}}}'
    )


def _record_json(
    queries: CatalogueQueries,
    row: TensorColumns,
    root: str,
    param_of: Mapping[str, str] | None,
    types: Mapping[str, str],
) -> str:
    """The general path: the row as records, encoded. A page row's stats are all but the magnitude
    histogram, which the tensor's own endpoint has (it is about half of a row, and a page is read
    for its table)."""
    info, stats = queries.row_to_info(row, root), row_to_stats(row)
    record = tensor_record(info, None, parameter_of(param_of, root, info.name)) | {
        "stats": None if stats is None else stats.to_json(with_log_hist=False),
        "init": insights_svc.init_json(info, stats, types),
    }
    return _dumps(record)


@lru_cache(maxsize=4096)
def _contiguous(shape: str) -> tuple[int, ...]:
    """The stride of a contiguous tensor of a stored shape (``"[8,16]"`` -> ``(16, 1)``)."""
    return contiguous_stride(int_tuple(shape))


def _number(value: Any) -> str:
    if type(value) is float:  # exactly a float (not an int or a bool)
        return "null" if finite_or_none(value) is None else float.__repr__(value)
    return "null" if value is None else _dumps(value)


def _stats_json(row: TensorColumns) -> str | None:
    """``TensorStats.to_json(with_log_hist=False)`` of a row, its histogram fragments copied from
    the stored text; None when that text is not in ``save_stats``' layout (``{bins, min, max, note,
    percentiles, log}``, finite numbers)."""
    text: str = row["hist"]
    if not text.startswith('{"bins":[') or not text.endswith("}") or "NaN" in text or "Infinity" in text:
        return None
    bins_end = text.find("]") + 1
    max_at = text.find(',"max":', bins_end)
    note_at = text.find(',"note":', max_at)
    # percentiles and log hold numbers only, so their keys are the last of their kind in the text;
    # min and max hold a number or null, so the first keys after them are the real ones
    percentiles_at = text.rfind(',"percentiles":')
    log_at = text.rfind(',"log":')
    if not (text.startswith(',"min":', bins_end) and bins_end < max_at < note_at < percentiles_at < log_at):
        return None
    parts = [f'{{"numel":{int(row["numel"])}']
    parts += [f'"{name}":{_number(row[name]) if is_float else int(row[name] or 0)}' for name, is_float in _DECLARED]
    parts.append(
        f'"hist":{text[8:bins_end]},"hist_min":{text[bins_end + 7 : max_at]},"hist_max":{text[max_at + 7 : note_at]},'
        f'"note":{text[note_at + 8 : percentiles_at]},"percentiles":{text[percentiles_at + 15 : log_at]},'
        f'"log_hist":null,"digest":{"null" if row["digest"] is None else _string(row["digest"])}}}'
    )
    return ",".join(parts)


def _init_json(text: str | None) -> str | None:
    """The stored init verdict as ``InitVerdict.to_json`` writes it, or None when it must be
    judged (none stored) or its text is not ``{verdict, matches, score}`` with a finite score."""
    if text is None or not text.startswith(_INIT_PREFIXES) or not text.endswith("}"):
        return None
    score_at = text.rfind(',"score":')
    score = text[score_at + 9 : -1] if score_at > 0 else ""
    if score != "null":
        try:
            value = float(score)
        except ValueError:
            return None
        if finite_or_none(value) is None or '"' in score:
            return None
    return text
