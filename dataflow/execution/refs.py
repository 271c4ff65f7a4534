"""What travels on an edge between two stages, by reference: the coordinator and the workers
pass these (pickled over the workers' pipes), never the data itself.

- :class:`ObjRef`: a store object (an array, an Arrow table, bytes), by its id and kind;
- :class:`PathRef`: a folder (a stream port's files), by its path;
- :class:`ValRef`: a string or a primitive, the value itself (small).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ObjRef", "PathRef", "Ref", "ValRef"]


class ObjRef(NamedTuple):
    id: str
    kind: str = "tensor"  # tensor | arrow | bytes | cuda (the store's kinds)


class PathRef(NamedTuple):
    path: str


class ValRef(NamedTuple):
    value: Any


Ref = ObjRef | PathRef | ValRef
