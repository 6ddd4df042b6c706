"""k-bit packing (spec: little-endian bit stream, code i at stream bits [i*k, (i+1)*k), LSB first)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub.errors import FormatError
from deltahub.format.bitpack import lookup, pack, packed_nbytes, unpack

BITS = st.integers(min_value=1, max_value=8)


@st.composite
def codes_and_bits(draw, max_len: int = 300):
    bits = draw(BITS)
    n = draw(st.one_of(st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17]), st.integers(0, max_len)))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=n, max_size=n))
    return np.array(codes, dtype=np.uint8), bits


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The spec's definition, bit by bit: stream bit b is bit b % 8 of byte b // 8."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, c in enumerate(codes):
        for j in range(bits):
            if (c >> j) & 1:
                b = i * bits + j
                out[b // 8] |= 1 << (b % 8)
    return out


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_round_trip_every_width_and_length(cb):
    codes, bits = cb
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(codes.size, bits) == (codes.size * bits + 7) // 8
    out = unpack(packed, bits, codes.size)
    assert out.dtype == torch.uint8
    assert out.tolist() == codes.tolist()


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_lookup_is_the_table_at_each_code(cb):
    codes, bits = cb
    if bits not in (1, 2, 4):
        with pytest.raises(ValueError, match="1-, 2- or 4-bit"):
            lookup(pack(codes, bits), bits, codes.size, torch.zeros(1 << bits))
        return
    table = torch.randn(1 << bits)
    out = lookup(pack(codes, bits), bits, codes.size, table)
    assert out.dtype == table.dtype and out.shape == (codes.size,)
    assert torch.equal(out, table[torch.from_numpy(codes).to(torch.int64)])


def test_lookup_refuses_a_table_of_the_wrong_size_and_a_short_stream():
    with pytest.raises(ValueError, match="holds 16 values"):
        lookup(pack(np.array([1, 2]), 4), 4, 2, torch.zeros(8))
    with pytest.raises(FormatError, match="3 4-bit codes"):
        lookup(torch.zeros(1, dtype=torch.uint8), 4, 3, torch.zeros(16))


@settings(max_examples=100, deadline=None)
@given(codes_and_bits(max_len=60))
def test_pack_matches_the_bitwise_definition(cb):
    codes, bits = cb
    assert pack(codes, bits).tolist() == reference_pack(codes.tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9])
def test_each_width_at_awkward_lengths(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
    packed = pack(torch.from_numpy(codes), bits)  # torch input too
    assert packed.numel() == (n * bits + 7) // 8
    assert unpack(packed.numpy(), bits, n).tolist() == codes.tolist()  # numpy input too
    if n * bits % 8:
        # unused high bits of the last byte are zero
        used = n * bits % 8
        assert int(packed[-1]) >> used == 0


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), BITS)
def test_packed_size_formula(count, bits):
    assert packed_nbytes(count, bits) == -(-count * bits // 8)
    assert packed_nbytes(count, bits) * 8 - count * bits in range(8)


def test_known_bit_order():
    assert pack(np.array([1, 0, 3]), 2).tolist() == [0b110001]
    assert pack(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b00000001, 0b00000001]
    # 3-bit codes straddle bytes: 5 = 101, 6 = 110 -> stream 101 011 (LSB first) -> byte 0b00110101
    assert pack(np.array([5, 6]), 3).tolist() == [0b00110101]
    assert pack(np.array([7, 7, 7]), 3).tolist() == [0xFF, 0b1]
    assert pack(np.array([0xAB, 0x01]), 8).tolist() == [0xAB, 0x01]
    assert pack(np.array([0x5, 0xA]), 4).tolist() == [0xA5]
    assert unpack(torch.tensor([0b110001], dtype=torch.uint8), 2, 3).tolist() == [1, 0, 3]


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_wide_is_refused(bits):
    with pytest.raises(ValueError):
        pack(np.array([0, 1 << bits]), bits)


@settings(max_examples=60, deadline=None)
@given(BITS, st.one_of(st.integers(256, 2**40), st.integers(-(2**40), -1)), st.booleans())
def test_codes_outside_a_byte_are_refused_not_wrapped(bits, bad, as_torch):
    codes = np.array([0, bad, 1 % (1 << bits)], dtype=np.int64)
    with pytest.raises(ValueError):
        pack(torch.from_numpy(codes) if as_torch else codes, bits)


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_width_is_refused(bits):
    with pytest.raises(ValueError):
        pack(np.array([0]), bits)
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 1)


@pytest.mark.parametrize("bits,count,nbytes", [(1, 9, 1), (2, 3, 2), (3, 5, 1), (8, 4, 5)])
def test_wrong_byte_count_is_a_format_error(bits, count, nbytes):
    with pytest.raises(FormatError):
        unpack(torch.zeros(nbytes, dtype=torch.uint8), bits, count)


@pytest.mark.parametrize("bits", [1, 3, 7])
def test_long_streams_across_the_internal_chunks(bits):
    from deltahub.format.bitpack import _CHUNK

    n = _CHUNK + 13  # packing works in slices of _CHUNK codes: cross a boundary, end mid-byte
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=n, dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert np.array_equal(unpack(packed, bits, n).numpy(), codes)
    # the bytes around the boundary are exactly the bitwise definition's
    lo = _CHUNK - 16
    window = reference_pack(codes[lo : lo + 32].tolist(), bits)
    assert packed[lo * bits // 8 : lo * bits // 8 + len(window)].tolist() == window
