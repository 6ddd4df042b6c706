"""Uniform group quantization: value = scale * (code - zero), round to nearest with the stored scale."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.format.quant import F16_MIN_NORMAL, dequantize_groups, quantize_groups, quantize_tensor

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# float32 arithmetic in x / scale, rounding and scale * (code - zero): a few ulps of the values.
REL = 1e-5


def per_element_scale(scale: torch.Tensor, group_size: int, length: int) -> torch.Tensor:
    return scale.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :length]


def check_bound(x: torch.Tensor, bits: int, group_size: int, scale_dtype=None):
    q = quantize_groups(x, bits, group_size, scale_dtype)
    n, length = x.shape
    ngroups = -(-length // group_size)
    assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == (n, length)
    assert tuple(q.scale.shape) == (n, ngroups) and tuple(q.zero.shape) == (n, ngroups)
    assert q.zero.dtype == torch.uint8
    if q.codes.numel():
        assert int(q.codes.max()) <= (1 << bits) - 1
    if q.zero.numel():
        assert int(q.zero.max()) <= (1 << bits) - 1
    assert bool((q.scale.to(torch.float32) > 0).all())
    d = dequantize_groups(q.codes, q.scale, q.zero, group_size)
    assert d.dtype == torch.float32 and tuple(d.shape) == (n, length)
    s = per_element_scale(q.scale, group_size, length)
    err = (d - x.to(torch.float32)).abs()
    bound = s / 2 * (1 + REL) + REL * x.to(torch.float32).abs()
    assert bool((err <= bound).all()), f"max err/scale = {float((err / s).max())}"
    return q, d


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw):
    n = draw(st.integers(1, 4))
    length = draw(st.integers(0, 40))
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))
    vals = draw(st.lists(finite, min_size=n * length, max_size=n * length))
    return torch.tensor(vals, dtype=torch.float32).reshape(n, length) * magnitude / 1e4


@settings(max_examples=200, deadline=None)
@given(matrices(), st.integers(1, 8), st.integers(1, 17))
def test_error_at_most_half_a_step(x, bits, group_size):
    check_bound(x, bits, group_size)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.sampled_from([1, 2, 3, 5, 7, 8, 31, 32, 33, 64, 128]), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_error_bound_on_gaussian_rows(bits, group_size, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, generator=g) * 10 ** float(torch.empty(1).uniform_(-3, 2, generator=g))
    check_bound(x, bits, group_size)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_error_bound_with_each_scale_dtype(bits, scale_dtype):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 257, generator=g) * 0.37
    q, _ = check_bound(x, bits, 64, scale_dtype)
    assert q.scale.dtype == scale_dtype


@settings(max_examples=120, deadline=None)
@given(matrices(), st.integers(1, 8), st.integers(1, 9))
def test_zero_is_exactly_representable(x, bits, group_size):
    x = x.clone()
    if x.numel():
        x.view(-1)[:: max(1, x.numel() // 3)] = 0.0
    q = quantize_groups(x, bits, group_size)
    d = dequantize_groups(q.codes, q.scale, q.zero, group_size)
    zeros = x == 0
    assert bool((d[zeros] == 0).all())
    # the zero point is the code of 0.0
    zero_per_elem = q.zero.to(torch.int64).repeat_interleave(group_size, dim=1)[:, : x.shape[1]]
    assert bool((q.codes.to(torch.int64)[zeros] == zero_per_elem[zeros]).all())


@pytest.mark.parametrize("length,group_size", [(0, 4), (1, 4), (3, 4), (4, 4), (5, 4), (7, 128), (129, 128), (255, 128), (256, 128), (5, 1)])
def test_awkward_lengths_versus_groups(length, group_size):
    x = torch.linspace(-1.5, 0.7, max(length, 1))[:length].reshape(1, length).repeat(2, 1)
    x[1] *= -3
    q, d = check_bound(x, 3, group_size)
    assert q.scale.shape[1] == math.ceil(length / group_size)


def test_all_zero_groups_decode_to_zero():
    x = torch.zeros(2, 10)
    x[1, 7] = 0.5  # second group of row 1 is not all zero
    q = quantize_groups(x, 4, 5)
    d = dequantize_groups(q.codes, q.scale, q.zero, 5)
    assert d[0].tolist() == [0.0] * 10
    assert d[1, :5].tolist() == [0.0] * 5
    assert float(d[1, 7]) == pytest.approx(0.5, abs=float(q.scale[1, 1]) / 2)


def test_group_range_includes_zero():
    # all-positive group: range is [0, max], so zero code is 0 and the max is hit within half a step
    x = torch.tensor([[1.0, 2.0, 3.0]])
    q = quantize_groups(x, 2, 3)
    assert int(q.zero[0, 0]) == 0
    # all-negative group: zero is at the top code
    q = quantize_groups(-x, 2, 3)
    assert int(q.zero[0, 0]) == 3


def test_tiny_scales_fall_back_to_float32():
    x = torch.full((1, 8), F16_MIN_NORMAL / 1000)
    x[0, 0] = -x[0, 0]
    q = quantize_groups(x, 4, 8)
    assert q.scale.dtype == torch.float32
    check_bound(x, 4, 8)
    q = quantize_groups(torch.randn(2, 8), 4, 8)
    assert q.scale.dtype == torch.float16


def test_known_example():
    q = quantize_groups(torch.tensor([[0.5, -1.0, 0.75]]), bits=2, group_size=2)
    assert dequantize_groups(q.codes, q.scale, q.zero, 2).tolist() == [[0.5, -1.0, 0.75]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 200), st.integers(0, 2**31 - 1))
def test_quantize_tensor_is_one_float32_group(bits, n, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.01
    codes, scale, zero = quantize_tensor(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert isinstance(scale, float) and isinstance(zero, int) and 0 <= zero < (1 << bits)
    assert scale > 0
    d = scale * (codes.to(torch.float32) - zero)
    assert bool(((d - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all())


@pytest.mark.parametrize("bits,gs", [(0, 4), (9, 4), (4, 0)])
def test_bad_parameters(bits, gs):
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(1, 4), bits, gs)
