r"""Where a layer's units are after the shape ops between the layer and its activation.

The paper's form multiplies each unit's output by ``sign(r)`` after the unit's activation
(:mod:`georeparam.signs`). Between the layer and that activation the output may be reshaped,
transposed, split or pooled; :mod:`georeparam.placement` records those ops as a short list of
tuples, and this module follows the unit axes through them, on concrete shapes:

* at ``register``, on a probe shape (batch 3, distinct spatial sizes), to decide whether the units
  stay identifiable (else the layer keeps the weight form, and the report names the op);
* in the sign hook, on the real shapes, to put each unit's sign on the entries that unit owns.

A state is :class:`UnitAxes`: the units ``lo … hi`` of the layer occupy the consecutive axes
``first … last`` of a tensor of ``shape``, unit-major (a flatten of the unit axis with the axes
after it gives each unit a block of entries). Sizes may be ``None`` (unknown: after a pool).

# Note [What keeps a unit identifiable]
Row-major index arithmetic: a tensor's flat index is ``outer·(G·Q) + (u·m + i)·Q + q`` with ``u``
the unit, ``P`` the product of the sizes before the unit axes, ``G = U·m`` their product and
``Q`` the rest. A view keeps ``u`` recoverable iff the new shape has a prefix of product ``P``
followed by axes of product ``g`` with ``U | g`` and ``g | G·Q``: then ``u = (index within
those axes) // (g / U)``. Anything that merges axes before the units into them (``view(-1)``), or a
permutation that splits the unit axes, loses the unit; the layer keeps the weight form.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

from torch import Tensor

__all__ = [
    "UnitAxes",
    "Lost",
    "start",
    "step",
    "follow",
    "broadcast",
    "probe_shape",
    "standard",
    "is_trivial",
    "ELEMENTWISE",
]

#: op tags that change neither shape nor unit position
ELEMENTWISE = "same"


class Lost(Exception):
    """The units are no longer identifiable after an op (the message says why)."""


class UnitAxes(NamedTuple):
    shape: Tuple[Optional[int], ...]
    first: int
    last: int
    lo: int
    hi: int


def start(shape: Sequence[Optional[int]], axis_from_end: int, units: int) -> UnitAxes:
    """The layer's own output: units ``0 … units`` along ``axis_from_end`` (``−1`` Linear, ``−(d+1)`` ConvNd)."""
    rank = len(shape)
    a = rank + axis_from_end
    if a < 0:
        raise Lost(f"an output of rank {rank} has no unit axis {axis_from_end}")
    return UnitAxes(tuple(shape), a, a, 0, units)


def probe_shape(axis_from_end: int, units: int) -> Tuple[int, ...]:
    """A batched probe output: batch 3, units, then distinct spatial sizes (7, 11, 13)."""
    spatial = (7, 11, 13)[: -axis_from_end - 1]
    return (3, units) + spatial


def _norm(d: int, rank: int, what: str) -> int:
    if not isinstance(d, int) or not -rank <= d < rank:
        raise Lost(f"{what}: dim {d!r} for rank {rank}")
    return d + rank if d < 0 else d


def _prod(xs) -> Optional[int]:
    out = 1
    for x in xs:
        if x is None:
            return None
        out *= x
    return out


def _view(st: UnitAxes, new: List[Optional[int]], what: str) -> UnitAxes:
    """Note [What keeps a unit identifiable]."""
    total = _prod(st.shape)
    unknown = [i for i, v in enumerate(new) if v is None or v == -1]
    if total is None:
        raise Lost(f"{what} after an op of unknown output size")
    if len(unknown) > 1:
        raise Lost(f"{what} with {len(unknown)} sizes known only at run time")
    if unknown:
        rest = _prod(v for i, v in enumerate(new) if i not in unknown)
        if not rest or total % rest:
            raise Lost(f"{what}: sizes {new} do not fit {total} entries")
        new[unknown[0]] = total // rest
    if _prod(new) != total:
        raise Lost(f"{what}: sizes {new} do not fit {total} entries")
    P, U = _prod(st.shape[: st.first]), st.hi - st.lo
    G = total // P  # the units' block: U·m·Q entries
    cum = 1
    for f in range(len(new) + 1):
        if cum == P:
            g = 1
            for last in range(f, len(new)):
                g *= new[last]
                if g >= U and g % U == 0 and G % g == 0:
                    return UnitAxes(tuple(new), f, last, st.lo, st.hi)
                if g > G:
                    break
        if f < len(new):
            cum *= new[f]
        if cum > P:
            break
    raise Lost(f"{what} merges the units with the axes before them or splits them across others")


def step(st: UnitAxes, op: tuple, shapes: List[Tuple[Optional[int], ...]]) -> UnitAxes:
    """``st`` after ``op`` (``shapes``: the shape after each earlier op, for sizes read on the way)."""
    kind, shape, rank = op[0], list(st.shape), len(st.shape)
    f, last = st.first, st.last
    if kind == ELEMENTWISE:
        return st
    if kind == "unsqueeze":
        d = _norm(op[1], rank + 1, ".unsqueeze()")
        shape.insert(d, 1)
        if d <= f:
            return UnitAxes(tuple(shape), f + 1, last + 1, st.lo, st.hi)
        return UnitAxes(tuple(shape), f, last + (1 if d <= last else 0), st.lo, st.hi)
    if kind == "squeeze":
        dims = [_norm(d, rank, ".squeeze()") for d in op[1]] if op[1] is not None else list(range(rank))
        for i in sorted(dims, reverse=True):
            if shape[i] is None:
                raise Lost(".squeeze() of an axis of unknown size")
            if shape[i] != 1:
                continue
            if f <= i <= last and f == last:
                raise Lost(".squeeze() removes the unit axis")
            del shape[i]
            if i < f:
                f, last = f - 1, last - 1
            elif i <= last:
                last -= 1
        return UnitAxes(tuple(shape), f, last, st.lo, st.hi)
    if kind in ("transpose", "permute"):
        if kind == "transpose":
            a, b = _norm(op[1], rank, ".transpose()"), _norm(op[2], rank, ".transpose()")
            dims = list(range(rank))
            dims[a], dims[b] = dims[b], dims[a]
        else:
            dims = [_norm(d, rank, ".permute()") for d in op[1]]
            if sorted(dims) != list(range(rank)):
                raise Lost(f".permute({dims}) is not a permutation of rank {rank}")
        pos = {old: new for new, old in enumerate(dims)}
        where = [pos[i] for i in range(f, last + 1)]
        if where != list(range(where[0], where[0] + len(where))):
            raise Lost(f"{'.transpose()' if kind == 'transpose' else '.permute()'} splits the unit axes")
        return UnitAxes(tuple(shape[d] for d in dims), where[0], where[-1], st.lo, st.hi)
    if kind == "view":
        sizes = [shapes[s[1]][s[2]] if isinstance(s, tuple) else s for s in op[1]]
        return _view(st, sizes, ".view()/.reshape()")
    if kind == "flatten":
        s, e = _norm(op[1], rank, "flatten") if rank else 0, _norm(op[2], rank, "flatten") if rank else 0
        if s > e:
            raise Lost("flatten with start_dim > end_dim")
        new = shape[:s] + [_prod(shape[s : e + 1])] + shape[e + 1 :]
        if _prod(shape) is not None:
            return _view(st, new, "flatten")
        if e < f:
            return UnitAxes(tuple(new), f - (e - s), last - (e - s), st.lo, st.hi)
        if s > last:
            return UnitAxes(tuple(new), f, last, st.lo, st.hi)
        if s < f:
            raise Lost("flatten merges the axes before the units into them")
        return UnitAxes(tuple(new), f, s if e >= last else last - (e - s), st.lo, st.hi)
    if kind == "unflatten":
        d = _norm(op[1], rank, ".unflatten()")
        new = shape[:d] + list(op[2]) + shape[d + 1 :]
        if d > last:
            return UnitAxes(tuple(new), f, last, st.lo, st.hi)
        if d < f:
            return UnitAxes(tuple(new), f + len(op[2]) - 1, last + len(op[2]) - 1, st.lo, st.hi)
        return _view(st, new, ".unflatten()")
    if kind == "pool":
        k = op[1]
        if last >= rank - k:
            raise Lost(f"a {k}-d pool over the unit axis")
        return UnitAxes(tuple(shape[: rank - k]) + (None,) * k, f, last, st.lo, st.hi)
    if kind in ("chunk", "split"):
        d = _norm(op[2], rank, f".{kind}()")
        n = shape[d]
        if n is None:
            raise Lost(f".{kind}() of an axis of unknown size")
        if kind == "chunk":
            size = -(-n // op[1])
            sizes = [min(size, n - i) for i in range(0, n, size)]
        elif isinstance(op[1], int):
            sizes = [min(op[1], n - i) for i in range(0, n, op[1])]
        else:
            sizes = list(op[1])
        if op[3] >= len(sizes) or sum(sizes) != n:
            raise Lost(f".{kind}() into {sizes} of an axis of {n}")
        lo = sum(sizes[: op[3]])
        shape[d] = sizes[op[3]]
        if d < f or d > last:
            return UnitAxes(tuple(shape), f, last, st.lo, st.hi)
        if f != last or n != st.hi - st.lo:
            raise Lost(f".{kind}() along a unit axis that also holds other entries")
        return UnitAxes(tuple(shape), f, last, st.lo + lo, st.lo + lo + sizes[op[3]])
    raise Lost(f"unknown op {kind!r}")


def follow(shape: Sequence[Optional[int]], axis_from_end: int, units: int, ops: Sequence[tuple]) -> UnitAxes:
    """The units after ``ops``, starting from a layer output of ``shape``; raises :class:`Lost`."""
    st = start(shape, axis_from_end, units)
    shapes = [st.shape]
    for op in ops:
        st = step(st, op, shapes)
        shapes.append(st.shape)
    return st


def broadcast(s: Tensor, st: UnitAxes, x: Tensor) -> Tensor:
    """The layer's signs ``s`` (one per unit) laid out to multiply ``x``, whose units are ``st``."""
    if x.dim() != len(st.shape) or any(a is not None and a != b for a, b in zip(st.shape, x.shape)):
        raise RuntimeError(
            f"GmP sign: expected the activation's output of shape {st.shape} (from the layer's output), "
            f"Got: {tuple(x.shape)}"
        )
    sub = s[st.lo : st.hi]
    block = tuple(x.shape[st.first : st.last + 1])
    n = math.prod(block)
    if n != sub.numel():
        sub = sub.repeat_interleave(n // sub.numel())
    return sub.reshape(block + (1,) * (x.dim() - st.last - 1))


def standard(st: UnitAxes, units: int) -> Optional[Tuple[int, bool]]:
    """``(unit axis from the end, flattened)`` where ``st`` is one whole axis holding all units
    (``flattened``: each unit a block of that axis); ``None`` otherwise (a consumer's columns
    cannot take the sign)."""
    if st.first != st.last or (st.lo, st.hi) != (0, units):
        return None
    n = st.shape[st.first]
    return st.first - len(st.shape), n is None or n != units


def is_trivial(ops: Sequence[tuple]) -> bool:
    """Whether ``ops`` leave shape and unit axis as they were (the sign needs no shapes)."""
    return all(op[0] == ELEMENTWISE or op[0] == "pool" for op in ops)
