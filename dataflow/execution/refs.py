"""What travels on an edge between two stages, by reference: the coordinator and the workers
pass these (pickled over the workers' pipes), never the data itself.

- :class:`ObjRef`: a store object (an array, an Arrow table, bytes), by its id and kind;
- :class:`PathRef`: a folder (a stream port's files), by its path;
- :class:`ValRef`: a string or a primitive, the value itself (small).

On the workers' pipes they travel as plain tuples (:func:`to_wire`, :func:`from_wire`): a
NamedTuple pickles through Python-level code, about 4 µs more per reference each way, which
is a measurable part of a 4 KiB hop (``benchmarks/engine.py``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ObjRef", "PathRef", "Ref", "ValRef", "from_wire", "to_wire"]


class ObjRef(NamedTuple):
    id: str
    kind: str = "tensor"  # tensor | arrow | bytes | cuda (the store's kinds)


class PathRef(NamedTuple):
    path: str


class ValRef(NamedTuple):
    value: Any


Ref = ObjRef | PathRef | ValRef

_KINDS = (ObjRef, PathRef, ValRef)
_TAGS = {kind: tag for tag, kind in enumerate(_KINDS)}


def to_wire(ref: Ref) -> tuple:
    """``ref`` as a plain tuple for a pipe: ``(tag, *fields)``."""
    return (_TAGS[type(ref)], *ref)


def from_wire(wire: tuple) -> Ref:
    """The reference :func:`to_wire` made ``wire`` from."""
    # tuple.__new__ in C: a NamedTuple's own __new__ is Python-level code, on every hop
    return tuple.__new__(_KINDS[wire[0]], wire[1:])
