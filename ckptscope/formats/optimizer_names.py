"""Which parameter each optimizer state tensor belongs to.

``torch.optim.Optimizer.state_dict()`` keys its per-parameter state by integer ids
(``optimizer.state.0.exp_avg``); the ids are the positions of the parameters in the param groups,
and each group lists its parameters as the training script gave them: ``model.parameters()``
(the state_dict's order without the buffers, tied parameters once) or a filter of
``named_parameters()`` (a frozen backbone's trainable part; the Trainer's decay / no-decay
groups). So each group is an ordered subsequence of the model's parameters, the groups are
disjoint, and a parameter's state tensors have its shape.

The optimizer's parameters are matched against the weights root's tensors on those terms (where
the root lists them in the model's order, as a pickled state_dict does; a safetensors file sorts
them by name, so beside one only shapes can tell, ``placement_by_shape``):
buffers (by the file's word, or known buffer names and non-float dtypes) and tied names are
not candidates; a parameter whose state is empty (no gradient yet) matches any shape. The match
is used only when it is the **only** one: two ways to place the groups (a frozen backbone whose
layers have the trainable ones' shapes) give no names at all, never a guess. Then the matched
tensors are parameters as the file says (``kind_source`` "file"), and every state tensor is
named by its parameter (``Checkpoint.param_of``).

Every tensor inside an optimizer's state dict is listed as a **buffer** the file says is one:
optimizer moments are state, not trainable values (a freeze plan never lists them; the module
tree's parameter count leaves them out).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .model import OptimizerLayout, TensorInfo

# state entries shaped like their parameter (Adam/AdamW, SGD momentum, RMSprop, Adagrad, ASGD)
STATE_OF_PARAMETER = ("exp_avg", "momentum_buffer", "square_avg", "sum", "exp_avg_sq", "ax")
MAX_STATES = 2_000_000  # placements of the groups looked at before giving up (no names)

Shape = tuple[int, ...] | None  # None: a parameter with no state (matches any tensor)


def _under(name: str, path: str) -> bool:
    return path == "" or name.startswith(path + ".")


def _state_prefix(layout: OptimizerLayout) -> str:
    return f"{layout.path}.state." if layout.path else "state."


def _group_shapes(layout: OptimizerLayout, by_name: dict[str, TensorInfo]) -> list[list[Shape]]:
    prefix = _state_prefix(layout)
    out: list[list[Shape]] = []
    for group in layout.groups:
        shapes: list[Shape] = []
        for pid in group:
            tensor = next((by_name[n] for k in STATE_OF_PARAMETER if (n := f"{prefix}{pid}.{k}") in by_name), None)
            shapes.append(None if tensor is None else tensor.shape)
        out.append(shapes)
    return out


def unique_placement(groups: Sequence[Sequence[Shape]], candidates: Sequence[tuple[int, ...]]) -> list[int] | None:
    """The one way to place every group as an ordered subsequence of ``candidates`` (disjoint,
    each item on a tensor of its shape, None on any): for each candidate, the index of the item
    (in the groups' concatenated order) placed on it, or -1. None when there is no way or more
    than one, or when looking would take more than MAX_STATES steps."""
    sizes = [len(g) for g in groups]
    skips = len(candidates) - sum(sizes)
    if skips < 0:
        return None
    starts = [sum(sizes[:g]) for g in range(len(groups))]
    # forward over the candidates; a state is how far each group got: (ways, 1 capped at 2; the
    # first predecessor state, the group placed on this candidate or -1). Where ways is 1 the
    # predecessor is the only one, so the single placement reads back from the end.
    start = tuple(0 for _ in groups)
    layers: list[dict[tuple[int, ...], tuple[int, tuple[int, ...], int]]] = [{start: (1, start, -1)}]
    looked = 0
    for i, shape in enumerate(candidates):
        current = layers[-1]
        following: dict[tuple[int, ...], tuple[int, tuple[int, ...], int]] = {}
        looked += len(current)
        if looked > MAX_STATES:
            return None
        for state, (ways, _, _) in current.items():
            moves: list[tuple[tuple[int, ...], int]] = []
            if i - sum(state) < skips:  # this candidate is no optimizer parameter
                moves.append((state, -1))
            for g, at in enumerate(state):
                if at < sizes[g] and (groups[g][at] is None or groups[g][at] == shape):
                    moves.append(((*state[:g], at + 1, *state[g + 1 :]), g))
            for nxt, g in moves:
                known = following.get(nxt)
                if known is None:
                    following[nxt] = (ways, state, g)
                else:
                    following[nxt] = (min(2, known[0] + ways), known[1], known[2])
        if not following:
            return None
        layers.append(following)
    end = tuple(sizes)
    final = layers[-1].get(end)
    if final is None or final[0] != 1:
        return None
    placed = [-1] * len(candidates)
    state = end
    for i in range(len(candidates), 0, -1):
        _, previous, g = layers[i][state]
        if g >= 0:
            placed[i - 1] = starts[g] + previous[g]
        state = previous
    return placed


def placement_by_shape(groups: Sequence[Sequence[Shape]], candidates: Sequence[tuple[int, ...]]) -> list[int] | None:
    """Where the candidates' order is not the model's (a safetensors file lists its tensors sorted
    by name): only when the optimizer's parameters have exactly the candidates' shapes (every
    candidate is one of them), each parameter of a shape no other has is placed on the one
    candidate of that shape; the others stay unplaced (-1). None when the shapes differ."""
    flat = [shape for g in groups for shape in g]
    if any(shape is None for shape in flat) or Counter(flat) != Counter(candidates):
        return None
    counts = Counter(flat)
    single = {shape: item for item, shape in enumerate(flat) if counts[shape] == 1}
    return [single.get(shape, -1) for shape in candidates]


def name_optimizer_state(
    tensors: list[TensorInfo], optimizers: Sequence[OptimizerLayout], root: str, *, ordered: bool = True
) -> tuple[list[TensorInfo], dict[str, str]]:
    """``tensors`` with every optimizer state tensor a buffer (the file says so) and, where the
    optimizers' parameters match the weights ``root``'s tensors in exactly one way, the matched
    tensors parameters (the file says so); and the map state tensor -> parameter (full names).
    ``ordered``: the root lists its tensors in the model's order (a pickled state_dict); else
    only shapes can tell (``placement_by_shape``)."""
    if not optimizers:
        return tensors, {}
    paths = [o.path for o in optimizers]
    tensors = [
        t._replace(kind="buffer", kind_source="file") if any(_under(t.name, p) for p in paths) else t for t in tensors
    ]
    by_name = {t.name: t for t in tensors}
    groups = [g for o in optimizers for g in _group_shapes(o, by_name)]
    ids = [(o, pid) for o in optimizers for group in o.groups for pid in group]
    if not ids or all(shape is None for g in groups for shape in g):
        return tensors, {}  # no state (SGD without momentum, before any step): nothing to tell by
    candidates = [
        t
        for t in tensors
        if _under(t.name, root)
        and t.alias_of is None
        and t.kind != "buffer"
        and not any(_under(t.name, p) for p in paths)
    ]
    shapes = [t.shape for t in candidates]
    placed = unique_placement(groups, shapes) if ordered else placement_by_shape(groups, shapes)
    if placed is None:
        return tensors, {}
    parameter_of_id = {ids[item]: candidates[i].name for i, item in enumerate(placed) if item >= 0}
    param_of: dict[str, str] = {}
    for o in optimizers:
        prefix = _state_prefix(o)
        for t in tensors:
            if t.name.startswith(prefix):
                pid = t.name[len(prefix) :].split(".", 1)[0]
                parameter = parameter_of_id.get((o, pid))
                if parameter is not None:
                    param_of[t.name] = parameter
    # in order: the placed tensors; by shape: every candidate is one of the optimizer's parameters
    matched = set(parameter_of_id.values()) if ordered else {t.name for t in candidates}
    tensors = [t._replace(kind="parameter", kind_source="file") if t.name in matched else t for t in tensors]
    return tensors, param_of
