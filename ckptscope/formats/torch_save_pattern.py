"""A checked fast path for the pickle ``torch.save`` writes for a state dict.

``torch.save(state_dict)`` (and transformers' ``save_pretrained(safe_serialization=False)``) write
``data.pkl`` in protocol 2 as one regular pattern: a dict or ``OrderedDict`` (possibly holding
further dicts, or small integers) whose values are ``_rebuild_tensor_v2`` calls on persistent
storage ids, in ``MARK ... SETITEMS`` batches; a module's ``state_dict()`` ends with a BUILD of
its ``_metadata`` (dicts of versions), which the general path records and never reads. Walking it
opcode by opcode in the pure-Python machine (``pickle_graph``) costs ~30 opcodes per tensor; here
one compiled regular expression (C speed) matches a whole entry (key and tensor) and Python only
checks what it captured. After the first tensors have been checked in full, their memo refs (the
rebuild function, "storage", the storage class, the location, OrderedDict) are compiled into the
pattern as literal bytes (``_run_pattern``), so each further entry matching it needs no lookups.

The fast path accepts only that pattern, opcode for opcode, and gives exactly what the general
path gives for it (the same values, storages and pickle report), or ``None`` so that the general
path reads the file (and gives whatever answer or error it gives): anything else, anything
unusual (another protocol, other globals, a memo put out of sequence, a get of an index not put
before or of a value the pattern does not expect there, negative or 8-byte integers, a storage
declared twice differently, a duplicate key, a tensor inside a BUILD state, bytes after STOP)
declines. It accepts no global but ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
and the typed ``torch.*Storage`` classes (none of them dangerous), allocates no more than the bytes
it reads account for (no backtracking beyond a bounded run; every step advances), and never
raises: it never refuses a file itself.

Memo: every put must take the next index (as picklers write them), so no index is ever put twice;
the indices are checked all at once at the end (a parse whose puts are out of sequence is thrown
away). Gets look up the value recorded at the index put before them (keyed by the index's bytes
as the put wrote them: a get in the other width is declined) and must name the kind of value the
pattern expects in that place.

Work: the general path's steps for what this accepts (a handful per tensor, each tensor at least
60 bytes of pickle) stay far below its budget (``WorkBudget.for_bytes``: 4 steps per byte), so
declining never hides a budget refusal.
"""

from __future__ import annotations

import re
import sys
from array import array
from typing import Any

from .model import MAX_DIMS
from .pickle_graph import MAX_MEMO
from .torch_pickle import _VALUES, PickledStorage, PickledTensor, StorageType

_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ODICT = ("collections", "OrderedDict")
MAX_DEPTH = 32  # nested dicts followed here (deeper: the general path)
MAX_RUN_PATTERNS = 16  # run patterns compiled for one file (~0.4 ms each); then the last is kept


class _GlobalRef:
    """A global recorded in the memo: its key and what it stands for."""

    __slots__ = ("key", "storage")

    def __init__(self, key: tuple[str, str], storage: StorageType | None = None) -> None:
        self.key = key
        self.storage = storage


_REBUILD_REF = _GlobalRef(_REBUILD)
_ODICT_REF = _GlobalRef(_ODICT)
_STORAGE_REFS: dict[bytes, _GlobalRef] = {}
for (_module, _name), _value in _VALUES.items():
    if _module == "torch" and isinstance(_value, StorageType) and _value.dtype is not None and not _value.quantized:
        _STORAGE_REFS[_name.encode()] = _GlobalRef((_module, _name), _value)
del _module, _name, _value

# --- the pattern (bytes, DOTALL) ---------------------------------------------------------------
# A put or a get captures its index's bytes (1 for BINPUT/BINGET, 4 for LONG_BINPUT/LONG_BINGET).
_PUT = rb"[qr]((?<=q).|(?<=r).{4})"
_GET = rb"[hj]((?<=h).|(?<=j).{4})"
_INT = rb"(?:K.|M..|J.{4})"  # BININT1, BININT2, BININT (negative ones are declined after)
_TUPLE = rb"(?:\)|(" + _INT + rb"\x85|" + _INT + rb"{2}\x86|" + _INT + rb"{3}\x87|\(" + _INT
_TUPLE += rb"{4," + str(MAX_DIMS).encode() + rb"}t)" + _PUT + rb")"
_RUN_TUPLE = _TUPLE.replace(_PUT, rb"r(.{4})")
_TENSOR = re.compile(
    rb"(?:ctorch\._utils\n_rebuild_tensor_v2\n" + _PUT + rb"|" + _GET + rb")"  # 1 2
    rb"\(\("
    rb"(?:X\x07\x00\x00\x00storage" + _PUT + rb"|" + _GET + rb")"  # 3 4
    rb"(?:ctorch\n(\w{1,64})\n" + _PUT + rb"|" + _GET + rb")"  # 5 6 7: storage class
    rb"(?:X(.)\x00\x00\x00([0-9]{1,19})" + _PUT + rb"|" + _GET + rb")"  # 8 9 10 11: storage key
    rb"(?:X(.)\x00\x00\x00([\w:.-]{1,64})" + _PUT + rb"|" + _GET + rb")"  # 12 13 14 15: location
    rb"(" + _INT + rb")"  # 16: numel
    rb"t" + _PUT + rb"Q"  # 17: the persistent id
    rb"("
    + _INT
    + rb")"  # 18: storage offset
    + _TUPLE  # 19 20: shape
    + _TUPLE  # 21 22: stride
    + rb"[\x88\x89]"  # requires_grad (not part of the listing)
    rb"(?:ccollections\nOrderedDict\n"
    + _PUT
    + rb"|"
    + _GET
    + rb")\)R"
    + _PUT  # 23 24 25: hooks
    + rb"t"
    + _PUT
    + rb"R"
    + _PUT,  # 26 27: the arguments, the tensor
    re.DOTALL,
)
_ODICT_CALL = re.compile(rb"(?:ccollections\nOrderedDict\n" + _PUT + rb"|" + _GET + rb")\)R" + _PUT, re.DOTALL)
_PUT_AFTER = re.compile(_PUT, re.DOTALL)
_REBUILD_GLOBAL = b"ctorch._utils\n_rebuild_tensor_v2\n"
_ODICT_GLOBAL = b"ccollections\nOrderedDict\n"

_X, _BINGET, _LONG_BINGET, _GLOBAL = 0x58, 0x68, 0x6A, 0x63
_EMPTY_DICT, _MARK, _SETITEMS, _SETITEM, _STOP, _BUILD = 0x7D, 0x28, 0x75, 0x73, 0x2E, 0x62
_BININT, _BININT1, _BININT2 = 0x4A, 0x4B, 0x4D


class _Decline(Exception):
    """The pickle leaves the pattern: the general path reads it."""


def _int(op: bytes) -> int:
    """A BININT1/BININT2/BININT the pattern matched; a negative one declines."""
    if op[0] == _BININT1:
        return op[1]
    value = int.from_bytes(op[1:], "little", signed=op[0] == 0x4A)
    if value < 0:
        raise _Decline
    return value


def _ints(body: bytes) -> tuple[int, ...]:
    """The integers of a tuple the pattern matched (TUPLE1-3, or MARK ... TUPLE)."""
    out: list[int] = []
    i = 1 if body[0] == _MARK else 0
    end = len(body) - 1  # the tuple opcode
    while i < end:
        op = body[i]
        width = 2 if op == 0x4B else 3 if op == 0x4D else 5
        out.append(_int(body[i : i + width]))
        i += width
    return tuple(out)


def _get_op(index: bytes) -> bytes:
    return (b"h" if len(index) == 1 else b"j") + index


def _run_pattern(refs: tuple[Any, ...]) -> re.Pattern[bytes]:
    """A whole entry (key and tensor) of the run that follows a tensor whose five memo refs (the
    rebuild function, "storage", the storage class, the location, OrderedDict) were checked:
    the same refs, as literal bytes, and LONG_BINPUTs (the memo is past 255 in a long run)."""
    fn, st, cls, loc, hooks = (re.escape(_get_op(r)) for r in refs)
    return re.compile(
        rb"r(.{4})"  # the key's put (the key itself is read before: its length)
        + fn
        + rb"\(\("
        + st
        + cls
        + rb"(?:X(.)\x00\x00\x00([0-9]{1,19})r(.{4})|"
        + _GET
        + rb")"  # the storage key
        + loc
        + rb"("
        + _INT
        + rb")tr(.{4})Q("
        + _INT
        + rb")"  # numel, the persistent id, the offset
        + _RUN_TUPLE
        + _RUN_TUPLE
        + rb"[\x88\x89]"
        + hooks
        + rb"\)Rr(.{4})tr(.{4})Rr(.{4})",
        re.DOTALL,
    )


def _holds_tensor(node: dict[Any, Any], depth: int) -> bool:
    """Whether a tensor lies in ``node`` (or it nests too deeply to say)."""
    if depth > MAX_DEPTH:
        return True
    return any(type(v) is PickledTensor or (type(v) is dict and _holds_tensor(v, depth + 1)) for v in node.values())


class _Reader:
    """One pickle's reading: a stack machine for the dict opcodes, the tensor entries matched whole."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.puts: list[bytes] = []  # the index bytes of every put, in order (checked at the end)
        self.gets: dict[bytes | None, Any] = {}  # index bytes -> the value put there (only those gettable)
        self.storages: dict[str, PickledStorage] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.tuples: dict[bytes | None, tuple[int, ...]] = {None: ()}
        self.seen_refs: tuple[Any, ...] = ()  # the memo refs of the last tensor, once checked
        self.open_dicts = 0
        self.run: re.Pattern[bytes] | None = None  # whole entries with the refs checked last (``_run_pattern``)
        self.run_ref = _REBUILD_REF  # the storage class and location of self.run's refs
        self.run_location = ""
        self.run_patterns = 0
        self.ordered: dict[int, dict[Any, Any]] = {}  # the dicts OrderedDict() made (kept alive: ids stay theirs)

    def count(self, key: tuple[str, str]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def global_ref(self, put: bytes | None, get: bytes | None, ref: _GlobalRef) -> None:
        """A global written out (``put`` its memo index) or got from the memo, which must be ``ref``."""
        if put is not None:
            self.puts.append(put)
            self.gets[put] = ref
        elif self.gets.get(get) is not ref:
            raise _Decline
        self.count(ref.key)

    def text(self, put: bytes | None, get: bytes | None, length: bytes | None, text: bytes | None) -> str:
        if put is not None:
            assert length is not None and text is not None
            if length[0] != len(text):
                raise _Decline
            value = text.decode("ascii")
            self.puts.append(put)
            self.gets[put] = value
            return value
        got = self.gets.get(get)
        if type(got) is not str:
            raise _Decline
        return got

    def storage(self, key: str, dtype: str, location: str, numel: int) -> PickledStorage:
        """The storage named ``key``, recorded on its first declaration; declared again with
        another size or dtype, it declines (the general path refuses it, in its words)."""
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = PickledStorage(key, dtype, location, numel)
        elif storage.numel != numel or storage.dtype != dtype:
            raise _Decline
        return storage

    def tuple_of(self, body: bytes | None, put: bytes | None) -> tuple[int, ...]:
        known = self.tuples.get(body)
        if known is None:
            assert body is not None
            known = self.tuples[body] = _ints(body)
        if put is not None:
            self.puts.append(put)
        return known

    def tensor(self, pos: int) -> tuple[PickledTensor, int]:
        m = _TENSOR.match(self.data, pos)
        if m is None:
            raise _Decline
        (fn_put, fn_get, st_put, st_get, cls, cls_put, cls_get, key_len, key, key_put, key_get,
         loc_len, loc, loc_put, loc_get, numel_op, pid_put, offset_op, shape, shape_put, stride,
         stride_put, hooks_put, hooks_get, hooks_call_put, args_put, tensor_put) = m.groups()  # fmt: skip
        puts = self.puts
        gets = self.gets
        refs = (fn_get, st_get, cls_get, loc_get, hooks_get)
        steady = fn_put is None and st_put is None and cls_put is None and loc_put is None and hooks_put is None
        if steady:  # every global and repeated string got from the memo: checked once per set of refs
            if refs != self.seen_refs:
                ref = gets.get(cls_get)
                if (
                    gets.get(fn_get) is not _REBUILD_REF
                    or gets.get(st_get) != "storage"
                    or type(ref) is not _GlobalRef
                    or ref.storage is None
                    or type(gets.get(loc_get)) is not str
                    or gets.get(hooks_get) is not _ODICT_REF
                ):
                    raise _Decline
                self.seen_refs = refs
                if self.run_patterns < MAX_RUN_PATTERNS:  # a bounded number of compiles per file
                    self.run_patterns += 1
                    self.run = _run_pattern(refs)
                    self.run_ref, self.run_location = ref, gets[loc_get]
            ref = gets[cls_get]
            counts = self.counts
            counts[_REBUILD] += 1
            counts[ref.key] += 1
            storage_key = self.text(key_put, key_get, key_len, key)
            location = gets[loc_get]
        else:
            self.global_ref(fn_put, fn_get, _REBUILD_REF)
            if st_put is not None:
                puts.append(st_put)
                gets[st_put] = "storage"
            elif gets.get(st_get) != "storage":
                raise _Decline
            if cls_put is not None:
                ref = _STORAGE_REFS.get(cls)
                if ref is None:
                    raise _Decline
                self.global_ref(cls_put, None, ref)
            else:
                ref = gets.get(cls_get)
                if type(ref) is not _GlobalRef or ref.storage is None:
                    raise _Decline
                self.count(ref.key)
            storage_key = self.text(key_put, key_get, key_len, key)
            location = self.text(loc_put, loc_get, loc_len, loc)
        storage_type = ref.storage
        assert storage_type is not None and storage_type.dtype is not None
        dtype = storage_type.dtype
        storage = self.storage(storage_key, dtype, location, _int(numel_op))
        puts.append(pid_put)
        offset = _int(offset_op)
        shape_t = self.tuple_of(shape, shape_put)
        stride_t = self.tuple_of(stride, stride_put)
        if len(shape_t) != len(stride_t):
            raise _Decline
        if steady:
            self.counts[_ODICT] += 1
        else:
            self.global_ref(hooks_put, hooks_get, _ODICT_REF)
        puts.append(hooks_call_put)
        puts.append(args_put)
        puts.append(tensor_put)
        tensor = PickledTensor(storage, dtype, offset, shape_t, stride_t)
        self.gets[tensor_put] = tensor
        return tensor, m.end()

    def entries(self, pos: int, stack: list[Any]) -> int:
        """Consecutive entries from ``pos`` that ``self.run`` matches (its memo refs checked
        before), each a key and its tensor; returns the position after the last (``pos`` when the
        first is not one)."""
        run = self.run
        assert run is not None
        data = self.data
        gets = self.gets
        extend = self.puts.extend
        append = stack.append
        ref = self.run_ref
        location = self.run_location
        assert ref.storage is not None and ref.storage.dtype is not None
        dtype = ref.storage.dtype
        count = 0
        end = len(data)
        while data[pos] == _X:
            start = pos + 5
            after = start + int.from_bytes(data[pos + 1 : start], "little")
            if after > end:
                raise _Decline
            m = run.match(data, after)
            if m is None:
                break
            key = data[start:after]
            (key_put, skey_len, skey, skey_put, skey_get, numel_op, pid_put, offset_op, shape, shape_put, stride,
             stride_put, hooks_put, args_put, tensor_put) = m.groups()  # fmt: skip
            name = key.decode("utf-8", "surrogatepass")
            if skey_put is not None:
                if skey_len[0] != len(skey):
                    raise _Decline
                storage_key = skey.decode("ascii")
            else:
                storage_key = gets.get(skey_get)
                if type(storage_key) is not str:
                    raise _Decline
            storage = self.storage(storage_key, dtype, location, _int(numel_op))
            shape_t = self.tuple_of(shape, None)  # (the puts are recorded below, in their order)
            stride_t = self.tuple_of(stride, None)
            if len(shape_t) != len(stride_t):
                raise _Decline
            tensor = PickledTensor(storage, dtype, _int(offset_op), shape_t, stride_t)
            extend(filter(None, (key_put, skey_put, pid_put, shape_put, stride_put, hooks_put, args_put, tensor_put)))
            gets[key_put] = name
            if skey_put is not None:
                gets[skey_put] = storage_key
            gets[tensor_put] = tensor
            append(name)
            append(tensor)
            count += 1
            pos = m.end()
        counts = self.counts
        for global_key in (_REBUILD, ref.key, _ODICT):
            counts[global_key] += count
        return pos

    def read(self) -> Any:
        data = self.data
        if not data.startswith(b"\x80\x02"):
            raise _Decline
        stack: list[Any] = []
        marks: list[int] = []
        gets = self.gets
        pos = 2
        end = len(data)
        while pos < end:
            op = data[pos]
            if op == _X and self.run is not None and (after := self.entries(pos, stack)) != pos:
                pos = after
            elif op == _X:  # a key
                length = int.from_bytes(data[pos + 1 : pos + 5], "little")
                start = pos + 5
                pos = start + length
                if pos > end:
                    raise _Decline
                text = data[start:pos].decode("utf-8", "surrogatepass")
                m = _PUT_AFTER.match(data, pos)
                if m is None:
                    raise _Decline
                self.puts.append(m.group(1))
                gets[m.group(1)] = text
                stack.append(text)
                pos = m.end()
            elif op == _BINGET or op == _LONG_BINGET:
                index = data[pos + 1 : pos + (2 if op == _BINGET else 5)]
                value = gets.get(index)
                if value is _REBUILD_REF:
                    tensor, pos = self.tensor(pos)
                    stack.append(tensor)
                elif value is _ODICT_REF:
                    pos = self.ordered_dict(pos, stack)
                elif type(value) is str or type(value) is PickledTensor:
                    stack.append(value)
                    pos += 1 + len(index)
                else:
                    raise _Decline
            elif op == _GLOBAL:
                if data.startswith(_REBUILD_GLOBAL, pos):
                    tensor, pos = self.tensor(pos)
                    stack.append(tensor)
                elif data.startswith(_ODICT_GLOBAL, pos):
                    pos = self.ordered_dict(pos, stack)
                else:
                    raise _Decline
            elif op == _EMPTY_DICT:
                m = _PUT_AFTER.match(data, pos + 1)
                if m is None:
                    raise _Decline
                self.puts.append(m.group(1))
                stack.append(self.new_dict())
                pos = m.end()
            elif op == _MARK:
                marks.append(len(stack))
                pos += 1
            elif op == _SETITEMS:
                if not marks:
                    raise _Decline
                at = marks.pop()
                items = stack[at:]
                del stack[at:]
                self.set_items(stack, items, marks[-1] if marks else 0)
                pos += 1
            elif op == _SETITEM:
                if len(stack) - 3 < (marks[-1] if marks else 0):
                    raise _Decline  # the pair and its dict lie within the current mark
                items = stack[-2:]
                del stack[-2:]
                self.set_items(stack, items, marks[-1] if marks else 0)
                pos += 1
            elif op == _BININT1:
                stack.append(data[pos + 1])
                pos += 2
            elif op == _BININT2 or op == _BININT:
                after = pos + (3 if op == _BININT2 else 5)
                if after > end:
                    raise _Decline
                stack.append(int.from_bytes(data[pos + 1 : after], "little", signed=op == _BININT))
                pos = after
            elif op == _BUILD:  # an OrderedDict's attributes (a module's state_dict()._metadata)
                if len(stack) - 2 < (marks[-1] if marks else 0):
                    raise _Decline
                state = stack.pop()
                if type(state) is not dict or id(stack[-1]) not in self.ordered or _holds_tensor(state, 0):
                    raise _Decline  # the general path records the state and never reads it: no tensors there
                self.open_dicts -= 1
                pos += 1
            elif op == _STOP:
                if pos + 1 != end or marks or len(stack) != 1 or type(stack[0]) is not dict:
                    raise _Decline
                return stack[0]
            else:
                raise _Decline
        raise _Decline

    def new_dict(self) -> dict[Any, Any]:
        self.open_dicts += 1  # dicts on the stack, not yet set into another: the nesting
        if self.open_dicts > MAX_DEPTH:
            raise _Decline
        return {}

    def ordered_dict(self, pos: int, stack: list[Any]) -> int:
        m = _ODICT_CALL.match(self.data, pos)
        if m is None:
            raise _Decline
        put, get, call_put = m.groups()
        self.global_ref(put, get, _ODICT_REF)
        self.puts.append(call_put)
        made = self.new_dict()
        self.ordered[id(made)] = made
        stack.append(made)
        return m.end()

    def set_items(self, stack: list[Any], items: list[Any], floor: int) -> None:
        """SETITEM(S): the pairs into the dict below them (within the current mark, as the
        machine's stack is)."""
        if len(stack) <= floor or len(items) % 2:
            raise _Decline
        target = stack[-1]
        if type(target) is not dict:
            raise _Decline
        for i in range(0, len(items), 2):
            key = items[i]
            value = items[i + 1]
            if type(key) is not str or key in target:
                raise _Decline
            if type(value) is dict:
                self.open_dicts -= 1
            elif type(value) is not PickledTensor and type(value) is not int:
                raise _Decline
            target[key] = value

    def puts_in_sequence(self) -> bool:
        """Every put took the next index: BINPUT 0..255, then LONG_BINPUT 256, 257, ..."""
        puts = self.puts
        if len(puts) > MAX_MEMO:
            return False
        small = b"".join(puts[:256])
        if small != bytes(range(len(small))) or len(small) != min(256, len(puts)):
            return False
        if len(puts) <= 256:
            return True
        large = b"".join(puts[256:])
        if len(large) != 4 * (len(puts) - 256):
            return False
        indices = array("I")
        if indices.itemsize != 4:  # pragma: no cover (every platform this runs on)
            return False
        indices.frombytes(large)
        if sys.byteorder != "little":  # pragma: no cover
            indices.byteswap()
        return indices == array("I", range(256, len(puts)))


def read_state_dict_pickle(
    data: bytes,
) -> tuple[dict[Any, Any], dict[str, PickledStorage], dict[tuple[str, str], int]] | None:
    """The state dict ``data`` (a ``data.pkl``) holds, its storages and the census of the globals it
    names (key -> times), exactly as the general path reads them; None when ``data`` is not the
    pattern (the general path then reads it)."""
    reader = _Reader(data)
    try:
        value = reader.read()
    except Exception:  # _Decline; an index or a decoding past what the pattern checked: all decline
        return None
    if not reader.puts_in_sequence():
        return None
    return value, reader.storages, reader.counts
