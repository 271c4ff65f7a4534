"""The shared-memory object store (our FastIO): zero-copy tensors and Arrow data between processes.

See ``docs/store.md``. The public names are imported lazily so that the store's server
process, which needs none of NumPy or Arrow, starts quickly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ObjectView", "Store", "StoreClient", "WritableObject", "connect"]

if TYPE_CHECKING:
    from dataflow.store.client import ObjectView, Store, StoreClient, WritableObject, connect


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dataflow.store import client

        return getattr(client, name)
    raise AttributeError(f"module 'dataflow.store' has no attribute {name!r}")
