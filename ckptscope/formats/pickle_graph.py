"""The pickle machine as a data recorder: unpickling builds an inert graph, nothing else.

Nothing in a pickle is ever imported or called. Every global becomes a ``Global`` record of its
dotted name (refused here already unless ``allowed`` accepts it); ``REDUCE``, ``NEWOBJ``, ``OBJ``
and ``INST`` become ``Call`` records of the callable and its arguments; ``BUILD`` only appends
the state to the record it applies to; ``SETITEM(S)`` and ``APPEND(S)`` on a record are recorded
in it; sets and frozensets become ``SetRecord`` lists; persistent ids become ``Persistent``
records. The records are plain slotted objects that hash by identity, with no ``__setstate__``
and no methods a pickle could reach beyond the recording ones. Each file gets a fresh machine;
the records are interpreted afterwards (``torch_pickle.interpret``), where tensors are validated
once.

Work is bounded by one budget per file (``WorkBudget``): the bytes read, and every step whose cost
does not follow from the file's size: hashing a dict key (a tuple that shares its parts can cost
2**n to hash for n bytes of pickle), interpreting the graph, rendering values.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import pickle
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ckptscope.errors import CheckpointError

MAX_MEMO = 50_000_000
BASE_WORK = 20_000_000  # steps any checkpoint may take, plus WORK_PER_BYTE for each pickle byte
WORK_PER_BYTE = 4


class WorkBudget:
    """Steps left for one file; running out refuses the file within seconds."""

    __slots__ = ("left",)

    def __init__(self, steps: int) -> None:
        self.left = steps

    @classmethod
    def for_bytes(cls, nbytes: int) -> WorkBudget:
        return cls(BASE_WORK + WORK_PER_BYTE * nbytes)

    def spend(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise CheckpointError(
                "limit_exceeded",
                "reading the pickle takes more work than any checkpoint needs (shared references nested "
                "so that the data grows exponentially)",
            )


class Global:
    """A global the pickle names (never imported)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.name)


class Call:
    """``func(*args)`` as the pickle asks for it, with what the pickle did to the result: BUILD
    states, items set and items appended. Recorded, never run."""

    __slots__ = ("func", "args", "kwargs", "states", "items", "appended")

    def __init__(self, func: Any, args: Any, kwargs: Any = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.states: list[Any] | None = None  # made when first needed: most calls have none
        self.items: list[tuple[Any, Any]] | None = None
        self.appended: list[Any] | None = None

    # the only methods the pickle machine calls on the object on top of its stack
    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = []
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        if self.appended is None:
            self.appended = []
        self.appended.append(value)

    def extend(self, values: list[Any]) -> None:
        if self.appended is None:
            self.appended = []
        self.appended.extend(values)


class Built:
    """BUILD applied to a plain container: the container and the recorded state."""

    __slots__ = ("target", "state")

    def __init__(self, target: Any, state: Any) -> None:
        self.target = target
        self.state = state


class SetRecord:
    """A set or frozenset, kept as the list of its items (building a real one would hash them)."""

    __slots__ = ("items", "frozen")

    def __init__(self, items: list[Any], frozen: bool) -> None:
        self.items = items
        self.frozen = frozen

    def add(self, item: Any) -> None:
        self.items.append(item)


class Persistent:
    """A persistent id (a storage reference in torch files), interpreted later."""

    __slots__ = ("pid",)

    def __init__(self, pid: Any) -> None:
        self.pid = pid


class Census:
    """What one file's pickles name, for the pickle report: every global with the times it is
    referenced, and whether torch's weights-only unpickler could read the opcodes used."""

    __slots__ = ("counts", "unsupported_opcode")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.unsupported_opcode: str | None = None  # the first opcode torch.load(weights_only=True) refuses

    def count(self, key: tuple[str, str]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1


# The opcodes torch's weights-only unpickler reads (torch/_weights_only_unpickler.py): torch.save
# writes protocol 2 with these; a pickle using any other (protocol 3's BINBYTES, 4's FRAME and
# STACK_GLOBAL, ...) fails torch.load(weights_only=True) whatever its globals.
WEIGHTS_ONLY_OPCODES = frozenset(
    op[0]
    for op in (
        pickle.APPEND, pickle.APPENDS, pickle.BINFLOAT, pickle.BINGET, pickle.BININT, pickle.BININT1,
        pickle.BININT2, pickle.BINPERSID, pickle.BINPUT, pickle.BINUNICODE, pickle.BUILD, pickle.EMPTY_DICT,
        pickle.EMPTY_LIST, pickle.EMPTY_SET, pickle.EMPTY_TUPLE, pickle.GLOBAL, pickle.LONG1, pickle.LONG_BINGET,
        pickle.LONG_BINPUT, pickle.MARK, pickle.NEWFALSE, pickle.NEWOBJ, pickle.NEWTRUE, pickle.NONE, pickle.PROTO,
        pickle.REDUCE, pickle.SETITEM, pickle.SETITEMS, pickle.SHORT_BINSTRING, pickle.STOP, pickle.TUPLE,
        pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
    )
)  # fmt: skip
_OPCODE_NAMES = {
    getattr(pickle, n)[0]: n
    for n in dir(pickle)
    if n.isupper() and isinstance(getattr(pickle, n), bytes) and len(getattr(pickle, n)) == 1
}


_FRAME = pickle.FRAME[0]
RECORDS = (Global, Call, Built, SetRecord, Persistent)
_CHEAP_KEYS = (str, int, float, bool, bytes, type(None), *RECORDS)


def _memo_full() -> CheckpointError:
    return CheckpointError("limit_exceeded", "pickle memo holds too many objects")


_U32 = struct.Struct("<I").unpack


class GraphUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that could run code, or do more work than the
    file's size accounts for, replaced by a recording one. (The C unpickler is not used: it grows
    its memo *array* to the largest LONG_BINPUT index, so 12 bytes make it allocate gigabytes.)"""

    if TYPE_CHECKING:  # what the pure-Python unpickler has (typeshed does not list it)
        readline: Callable[[], bytes]
        proto: int
        stack: list[Any]
        metastack: list[list[Any]]
        append: Callable[[Any], None]
        pop_mark: Callable[[], list[Any]]

    def __init__(
        self,
        stream: BinaryIO,
        budget: WorkBudget,
        allowed: Callable[[str, str], CheckpointError | None],
        census: Census | None = None,
    ) -> None:
        super().__init__(stream)
        self.memo: dict[int, Any] = {}  # at most MAX_MEMO entries: every put below checks
        self._budget = budget
        self._allowed = allowed
        self._census = census if census is not None else Census()
        self._key_costs: dict[int, tuple[Any, int]] = {}  # id -> (the tuple, kept alive; its cost)

    # --- the machine's loop: the stream's own reads until a FRAME ---------------------------------

    def load(self) -> Any:
        """``pickle._Unpickler.load`` reading through the stream's own (C) ``read`` until the pickle
        opens a frame (protocol 4 and later), and through the unframer, which checks frame
        boundaries, from then on. Without frames the unframer only forwards each read: torch.save's
        protocol-2 ``data.pkl`` takes one Python call less for each of its ~30 reads per tensor."""
        unframer = self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._file_read  # type: ignore[attr-defined]
        self.readinto = unframer.readinto  # BYTEARRAY8 only; without a frame it reads the stream
        self.readline = self._file_readline  # type: ignore[attr-defined]
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                code = key[0]
                dispatch[code](self)
                if code == _FRAME:  # the reads now go through the unframer
                    read = self.read
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    def load_frame(self) -> None:
        unframer = self._unframer
        self.read, self.readinto, self.readline = unframer.read, unframer.readinto, unframer.readline
        pickle._Unpickler.load_frame(self)  # type: ignore[attr-defined]

    # --- names ---------------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise CheckpointError("corrupt_pickle", "a global's name is not text")
        if self.proto < 3:  # Python 2 names, mapped as pickle.load and torch.load map them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        refusal = self._allowed(module, name)
        if refusal is not None:
            raise refusal
        self._census.count((module, name))
        return Global(module, name)

    # The memo: gets count a memoised global used again; puts keep the memo within MAX_MEMO. A
    # missing index is a KeyError, which ``unpickle_graph`` reports as a malformed pickle.

    def _got(self, value: Any) -> None:
        self.append(value)
        if value.__class__ is Global:
            self._census.count(value.key)

    def load_get(self) -> None:
        self._got(self.memo[int(self.readline()[:-1])])

    def load_binget(self) -> None:
        value = self.memo[self.read(1)[0]]
        self.append(value)
        if value.__class__ is Global:
            self._census.count(value.key)

    def load_long_binget(self) -> None:
        self._got(self.memo[_U32(self.read(4))[0]])

    def load_put(self) -> None:
        index = int(self.readline()[:-1])
        if index < 0:
            raise ValueError("negative PUT argument")  # a malformed pickle (unpickle_graph says so)
        memo = self.memo
        if len(memo) >= MAX_MEMO:
            raise _memo_full()
        memo[index] = self.stack[-1]

    def load_binput(self) -> None:
        memo = self.memo
        if len(memo) >= MAX_MEMO:
            raise _memo_full()
        memo[self.read(1)[0]] = self.stack[-1]

    def load_long_binput(self) -> None:
        memo = self.memo
        if len(memo) >= MAX_MEMO:
            raise _memo_full()
        memo[_U32(self.read(4))[0]] = self.stack[-1]

    def load_memoize(self) -> None:
        memo = self.memo
        if len(memo) >= MAX_MEMO:
            raise _memo_full()
        memo[len(memo)] = self.stack[-1]

    def load_tuple(self) -> None:
        items = self.stack
        self.stack = self.metastack.pop()
        self.append = self.stack.append
        self.append(tuple(items))

    def _line(self) -> str:
        line = self.readline()
        if not line.endswith(b"\n"):  # the file ends inside the name (CPython would chop a letter off)
            raise CheckpointError("corrupt_pickle", "the pickle ends inside a global's name")
        return str(line[:-1].decode("utf-8"))

    def load_global(self) -> None:
        module = self._line()
        name = self._line()
        self.append(self.find_class(module, name))

    def load_inst(self) -> None:
        module = self._line()
        name = self._line()
        klass = self.find_class(module, name)
        self._instantiate(klass, self.pop_mark())

    def get_extension(self, code: int) -> None:
        key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
        if not key:
            raise CheckpointError("corrupt_pickle", f"the pickle uses an unregistered extension code {code}")
        self.append(self.find_class(*key))

    def persistent_load(self, pid: Any) -> Persistent:
        return Persistent(pid)

    # --- calls and states: recorded ------------------------------------------------------------

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = Call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(Call(cls, args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(Call(cls, args, kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        self.append(Call(klass, tuple(args)))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Call):
            if inst.states is None:
                inst.states = []
            inst.states.append(state)
        else:
            self.stack[-1] = Built(inst, state)

    # --- containers: no hashing that the file's size does not pay for ---------------------------

    def _key(self, key: Any) -> Any:
        """Charge the cost of hashing ``key`` before a dict hashes it."""
        if not isinstance(key, _CHEAP_KEYS):
            self._budget.spend(self._hash_cost(key))
        return key

    def _hash_cost(self, value: Any) -> int:
        """What hashing ``value`` costs: its size as a tree (shared parts counted each time they
        appear), computed over the graph (each part once)."""
        if not isinstance(value, tuple):
            return 1
        known = self._key_costs.get(id(value))
        if known is not None:
            return known[1]
        self._budget.spend(len(value) + 1)
        cost = 1 + sum(self._hash_cost(v) for v in value)
        self._key_costs[id(value)] = (value, cost)
        return cost

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self.stack[-1][self._key(key)] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items) - 1, 2):
            target[self._key(items[i])] = items[i + 1]

    def load_dict(self) -> None:
        items = self.pop_mark()
        self.append({self._key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_empty_set(self) -> None:
        self.append(SetRecord([], frozen=False))

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, SetRecord):
            raise CheckpointError("corrupt_pickle", "ADDITEMS on something that is not a set")
        target.items.extend(items)

    def load_frozenset(self) -> None:
        self.append(SetRecord(self.pop_mark(), frozen=True))

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    for _opcode, _method in (
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.NEWOBJ_EX, load_newobj_ex),
        (pickle.BUILD, load_build),
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.DICT, load_dict),
        (pickle.EMPTY_SET, load_empty_set),
        (pickle.ADDITEMS, load_additems),
        (pickle.FROZENSET, load_frozenset),
        (pickle.GLOBAL, load_global),
        (pickle.INST, load_inst),
        (pickle.GET, load_get),
        (pickle.BINGET, load_binget),
        (pickle.LONG_BINGET, load_long_binget),
        (pickle.FRAME, load_frame),
        (pickle.PUT, load_put),
        (pickle.BINPUT, load_binput),
        (pickle.LONG_BINPUT, load_long_binput),
        (pickle.MEMOIZE, load_memoize),
        (pickle.TUPLE, load_tuple),
    ):
        dispatch[_opcode[0]] = _method
    del _opcode, _method

    def _note_opcode(self, code: int) -> None:
        if self._census.unsupported_opcode is None:
            self._census.unsupported_opcode = _OPCODE_NAMES.get(code, f"0x{code:02x}")


def _noting(code: int, method: Callable[[Any], None]) -> Callable[[Any], None]:
    def load(self: GraphUnpickler) -> None:
        self._note_opcode(code)
        method(self)

    return load


for _code, _load in list(GraphUnpickler.dispatch.items()):
    if _code not in WEIGHTS_ONLY_OPCODES:
        GraphUnpickler.dispatch[_code] = _noting(_code, _load)
del _code, _load


def unpickle_graph(
    data: bytes | BinaryIO,
    budget: WorkBudget,
    allowed: Callable[[str, str], CheckpointError | None],
    census: Census | None = None,
) -> Any:
    """The graph of one pickle, from bytes or from a stream's current position (left just past
    the pickle's STOP). Any failure becomes a CheckpointError with a message of ours. ``census``,
    when given, gathers what the pickle names (several pickles of one file may share one)."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        graph = GraphUnpickler(stream, budget, allowed, census).load()
        if isinstance(data, bytes) and stream.tell() != len(data):
            raise CheckpointError("corrupt_pickle", "the pickle is followed by more bytes (a second pickle?)")
        return graph
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError("corrupt_pickle", "the pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError("limit_exceeded", "the pickle needs too much memory to read") from None
    except EOFError:
        raise CheckpointError("corrupt_pickle", "the pickle ends before its STOP opcode") from None
    except Exception:  # malformed opcodes, arguments of the wrong type, bad lengths, ...
        raise CheckpointError("corrupt_pickle", "the pickle is malformed") from None
