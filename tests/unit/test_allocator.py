import itertools
import random

import pytest

from dataflow.store.allocator import ALIGNMENT, Allocator, align


def test_blocks_are_aligned_and_disjoint():
    alloc = Allocator(1 << 20)
    blocks = []
    for size in (1, 63, 64, 65, 1000, 4096, 12345):
        offset = alloc.allocate(size)
        assert offset is not None and offset % ALIGNMENT == 0
        blocks.append((offset, align(size)))
    blocks.sort()
    for (a, sa), (b, _) in itertools.pairwise(blocks):
        assert a + sa <= b


def test_full_arena_refuses_then_reuses_after_free():
    alloc = Allocator(4096)
    a = alloc.allocate(2048)
    b = alloc.allocate(2048)
    assert alloc.allocate(1) is None
    alloc.free(a)
    assert alloc.allocate(2048) == a
    alloc.free(b)
    assert alloc.allocated == 2048


def test_free_blocks_coalesce_back_to_one():
    alloc = Allocator(64 * 100)
    rng = random.Random(7)
    offsets = [alloc.allocate(rng.randrange(1, 200)) for _ in range(30)]
    rng.shuffle(offsets)
    for offset in offsets:
        alloc.free(offset)
    assert alloc.allocated == 0
    assert alloc.largest_free() == 64 * 100
    assert alloc.allocate(64 * 100) == 0


def test_fragmentation_is_reported_by_largest_free():
    alloc = Allocator(64 * 4)
    blocks = [alloc.allocate(64) for _ in range(4)]
    alloc.free(blocks[0])
    alloc.free(blocks[2])
    assert alloc.largest_free() == 64
    assert alloc.allocate(128) is None
    alloc.free(blocks[1])  # joins 0..2 into one block of 192
    assert alloc.largest_free() == 192


def test_freeing_unknown_offset_is_a_bug():
    with pytest.raises(KeyError):
        Allocator(4096).free(64)
