"""SplitMix64 keys and the masks built from them (spec: "Random masks")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.format import prng

MASK64 = (1 << 64) - 1


def splitmix64_reference(seed: int, count: int) -> list[int]:
    """The textbook SplitMix64 generator in plain Python integers (Steele, Lea and Flood, 2014)."""
    out = []
    state = seed & MASK64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def test_reference_value_seed_zero():
    assert splitmix64_reference(0, 1)[0] == 0xE220A8397B1DCDAF
    assert int(prng.keys(0, 0, 1)[0]) == 0xE220A8397B1DCDAF >> 11
    # the next outputs of the published generator for seed 0
    assert [int(k) for k in prng.keys(0, 0, 3)] == [v >> 11 for v in (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F)]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, 1000), st.integers(0, 40))
def test_keys_match_reference_generator(seed, start, count):
    ref = splitmix64_reference(seed, start + count)[start:]
    got = prng.keys(seed, start, count)
    assert got.dtype == torch.int64
    assert [int(k) for k in got] == [v >> 11 for v in ref]
    assert all(0 <= int(k) < 1 << prng.KEY_BITS for k in got)


def mix64_reference(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, (1 << 48) - 200_000))
def test_keys_far_into_a_tensor_span_chunks(seed, start):
    # 200K keys cross several of keys()' internal chunks; spot-check elements against the
    # spec's random-access formula, far from element 0 (a 70B model's embedding is 1.7e9 long).
    got = prng.keys(seed, start, 200_000)
    for i in (0, 1, 65_535, 65_536, 131_073, 199_999):
        t = start + i
        assert int(got[i]) == mix64_reference((seed + (t + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 11


@settings(max_examples=30, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, 1 << 40), st.integers(0, 150_000))
def test_the_torch_keys_for_other_devices_equal_the_cpu_keys(seed, start, count):
    # keys() computes with numpy on CPUs and with torch int64 elsewhere; run the torch path on
    # the CPU so that it is checked without a GPU too.
    assert torch.equal(prng._keys_torch(seed, start, count, "cpu"), prng.keys(seed, start, count))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_keys_on_cuda_equal_cpu_keys():
    seed, start, count = 0x0123456789ABCDEF, 12_345, 3_000_000
    assert torch.equal(prng.keys(seed, start, count, device="cuda").cpu(), prng.keys(seed, start, count))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, 500), st.integers(0, 100), st.integers(0, 100))
def test_keys_are_a_random_access_stream(seed, start, a, b):
    whole = prng.keys(seed, start, a + b)
    assert torch.equal(whole[:a], prng.keys(seed, start, a))
    assert torch.equal(whole[a:], prng.keys(seed, start + a, b))


@st.composite
def mask_shapes(draw):
    rows = draw(st.integers(0, 6))
    cols = draw(st.integers(0, 70))
    group = draw(st.integers(1, 20))
    keep = draw(st.integers(0, group))
    seed = draw(st.integers(0, MASK64))
    return seed, rows, cols, group, keep


@settings(max_examples=150, deadline=None)
@given(mask_shapes())
def test_group_mask_counts(args):
    seed, rows, cols, group, keep = args
    mask = prng.group_mask(seed, rows, cols, group, keep)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (rows, cols)
    full, tail = divmod(cols, group)
    for r in range(rows):
        for gi in range(full):
            assert int(mask[r, gi * group : (gi + 1) * group].sum()) == keep
        if tail:
            assert int(mask[r, full * group :].sum()) == (tail * keep) // group
    assert prng.group_keep_count(group, group, keep) == keep


@settings(max_examples=80, deadline=None)
@given(mask_shapes())
def test_group_mask_keeps_the_smallest_keys(args):
    seed, rows, cols, group, keep = args
    mask = prng.group_mask(seed, rows, cols, group, keep)
    k = prng.keys(seed, 0, rows * cols).reshape(rows, cols)
    for r in range(rows):
        for g0 in range(0, cols, group):
            kk = k[r, g0 : g0 + group]
            m = mask[r, g0 : g0 + group]
            if m.any() and (~m).any():
                assert kk[m].max() < kk[~m].min()


def test_group_mask_tail_examples():
    # 10 columns in groups of 4 keeping 3: two full groups keep 3, the tail of 2 keeps floor(2*3/4) = 1
    mask = prng.group_mask(123, 5, 10, 4, 3)
    assert mask[:, :8].reshape(5, 2, 4).sum(dim=2).tolist() == [[3, 3]] * 5
    assert mask[:, 8:].sum(dim=1).tolist() == [1] * 5
    # a tail of 1 with keep < group keeps nothing
    mask = prng.group_mask(7, 3, 9, 4, 3)
    assert mask[:, 8].tolist() == [False] * 3
    with pytest.raises(ValueError):
        prng.group_mask(0, 1, 4, 4, 5)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, 5), st.integers(0, 50), st.integers(0, 1 << prng.KEY_BITS))
def test_bernoulli_mask_is_key_below_threshold(seed, rows, cols, threshold):
    mask = prng.bernoulli_mask(seed, rows, cols, threshold)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (rows, cols)
    k = prng.keys(seed, 0, rows * cols).reshape(rows, cols)
    assert torch.equal(mask, k < threshold)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, MASK64), st.integers(0, 1 << 20), st.integers(0, 40))
def test_bernoulli_keep_at_a_threshold_equal_to_a_key(seed, start, i):
    """The test runs on the unshifted 64-bit value: a threshold equal to an element's key must
    drop it and one more must keep it, whatever the 11 bits shifted out."""
    k = prng.keys(seed, start, 41)
    key = int(k[i])
    for threshold, kept in ((key, False), (key + 1, True)):
        got = prng.bernoulli_keep(seed, start, 41, threshold)
        assert bool(got[i]) is kept
        assert np.array_equal(got, (k < threshold).numpy())


def test_bernoulli_extremes_and_rate():
    assert not prng.bernoulli_mask(5, 4, 4, 0).any()
    assert prng.bernoulli_mask(5, 4, 4, 1 << prng.KEY_BITS).all()
    assert prng.keep_probability_threshold(1.0) == 1 << prng.KEY_BITS
    assert prng.keep_probability_threshold(0.0) == 0
    assert prng.keep_probability_threshold(0.25) == 1 << (prng.KEY_BITS - 2)
    m = prng.bernoulli_mask(99, 100, 100, prng.keep_probability_threshold(0.3))
    assert abs(float(m.float().mean()) - 0.3) < 0.02  # 10k draws: ~4.6 standard deviations


def test_tensor_seed_is_deterministic_and_defined():
    s = prng.tensor_seed(0, "model.layers.0.mlp.down_proj.weight")
    assert s == prng.tensor_seed(0, "model.layers.0.mlp.down_proj.weight")
    assert s == int.from_bytes(hashlib.sha256(b"0:model.layers.0.mlp.down_proj.weight").digest()[:8], "little")
    assert 0 <= s <= MASK64
    assert prng.tensor_seed(1, "w") != prng.tensor_seed(0, "w")
    assert prng.tensor_seed(0, "w") != prng.tensor_seed(0, "v")
    assert prng.tensor_seed(0, "w[1]") != prng.tensor_seed(0, "w[0]")


def test_masks_are_the_same_across_internal_chunks():
    """Masks are built a slice of rows at a time: a mask over several slices is still one key stream."""
    rows, cols = 3, (1 << 21) + 5  # one row per slice; the tail group of each row has 5 columns
    k = prng.keys(11, 0, rows * cols).reshape(rows, cols).numpy()
    m = prng.bernoulli_mask(11, rows, cols, 1 << 52)
    assert np.array_equal(m.numpy(), k < 1 << 52)
    g = prng.group_mask(11, rows, cols, 8, 3).numpy()
    full = cols // 8 * 8
    groups = k[:, :full].reshape(rows, -1, 8)
    ref = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(ref, np.argsort(groups, axis=2)[:, :, :3], True, axis=2)
    assert np.array_equal(g[:, :full], ref.reshape(rows, full))
    assert g[:, full:].sum(axis=1).tolist() == [5 * 3 // 8] * rows
