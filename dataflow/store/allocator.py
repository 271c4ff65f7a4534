"""First-fit allocator over one arena of bytes (pure bookkeeping, no memory of its own).

Blocks are aligned to :data:`ALIGNMENT` bytes (a cache line; Arrow asks for 8 or 64). Free
blocks are kept sorted by offset and merged with their neighbours on free, so a long-running
store does not fragment into slivers.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 64

__all__ = ["ALIGNMENT", "Allocator", "align"]


def align(nbytes: int) -> int:
    """``nbytes`` rounded up to the allocator's alignment (at least one block)."""
    return max(ALIGNMENT, (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)


class Allocator:
    """Hands out aligned ``(offset, size)`` blocks of an arena of ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self._starts: list[int] = [0] if self.capacity else []  # free block offsets, sorted
        self._sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self._used: dict[int, int] = {}  # offset -> size of blocks handed out
        self.allocated = 0

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a new block of at least ``nbytes``, or None when no free block fits."""
        size = align(nbytes)
        for i, start in enumerate(self._starts):
            free = self._sizes[start]
            if free >= size:
                del self._sizes[start]
                if free == size:
                    del self._starts[i]
                else:
                    self._starts[i] = start + size
                    self._sizes[start + size] = free - size
                self._used[start] = size
                self.allocated += size
                return start
        return None

    def free(self, offset: int) -> None:
        """Return the block at ``offset``; merges it with free neighbours."""
        size = self._used.pop(offset)
        self.allocated -= size
        i = bisect.bisect_left(self._starts, offset)
        # merge with the following free block
        if i < len(self._starts) and self._starts[i] == offset + size:
            size += self._sizes.pop(self._starts[i])
            del self._starts[i]
        # merge with the preceding free block
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._sizes[prev] == offset:
                self._sizes[prev] += size
                return
        self._starts.insert(i, offset)
        self._sizes[offset] = size

    def largest_free(self) -> int:
        return max(self._sizes.values(), default=0)

    def block_size(self, offset: int) -> int:
        return self._used[offset]
