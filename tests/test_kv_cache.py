"""The KV cache: slot allocation, capacity growth by doubling up to its bound, keys kept in place on growth."""

from __future__ import annotations

import pytest
import torch

from mixtral.kv_cache import MIN_CAPACITY, KVCache


def make_cache(num_slots: int = 3, max_capacity: int = 256) -> KVCache:
    return KVCache(num_layers=2, num_slots=num_slots, num_kv_heads=2, head_dim=4, max_capacity=max_capacity, dtype=torch.float32)


def test_released_slots_are_reused_and_allocation_past_the_last_slot_raises() -> None:
    cache = make_cache(num_slots=3)
    slots = [cache.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and cache.free_slots == 0
    with pytest.raises(RuntimeError):
        cache.allocate()
    cache.release(slots[1])
    assert cache.free_slots == 1
    assert cache.allocate() == slots[1]
    with pytest.raises(RuntimeError):
        cache.allocate()


def test_reserve_doubles_from_min_capacity_up_to_max_capacity() -> None:
    cache = make_cache(max_capacity=100)
    assert cache.capacity == MIN_CAPACITY == 16
    seen = []
    for length in [1, 16, 17, 30, 33, 50, 64, 65, 99, 100, 101, 5000, 3]:
        cache.reserve(length)
        seen.append(cache.capacity)
        assert all(k.shape == (3, 2, cache.capacity, 4) for k in cache.k + cache.v)
    # Doubling 16 -> 32 -> 64 -> 128 is capped at 100; a shorter request never shrinks it.
    assert seen == [16, 16, 32, 32, 64, 64, 64, 100, 100, 100, 100, 100, 100]


def test_reserve_jumps_straight_to_the_power_of_two_that_fits() -> None:
    cache = make_cache(max_capacity=1024)
    cache.reserve(200)
    assert cache.capacity == 256


def test_growth_keeps_every_written_key_and_value_in_its_column() -> None:
    cache = make_cache(num_slots=3, max_capacity=256)
    g = torch.Generator().manual_seed(0)
    # Integer-valued entries, copied (not computed) on growth: exact comparison is right.
    written = [torch.randint(-1000, 1000, (3, 2, 16, 4), generator=g).float() for _ in range(4)]
    for layer in range(2):
        cache.k[layer][:] = written[2 * layer]
        cache.v[layer][:] = written[2 * layer + 1]
    cache.reserve(40)
    cache.reserve(100)
    assert cache.capacity == 128
    for layer in range(2):
        assert torch.equal(cache.k[layer][:, :, :16], written[2 * layer])
        assert torch.equal(cache.v[layer][:, :, :16], written[2 * layer + 1])


def test_a_sliding_window_caps_the_capacity_however_long_the_sequences() -> None:
    small = make_cache(max_capacity=8)  # a window below MIN_CAPACITY: never more than the window
    assert small.capacity == 8
    wide = make_cache(max_capacity=48)
    seen = []
    for length in [10, 20, 47, 48, 49, 1000, 10**6]:
        small.reserve(length)
        wide.reserve(length)
        assert small.capacity == 8 and small.k[0].shape[2] == 8
        seen.append(wide.capacity)
    assert seen == [16, 32, 48, 48, 48, 48, 48]
    assert wide.k[1].shape == (3, 2, 48, 4)
