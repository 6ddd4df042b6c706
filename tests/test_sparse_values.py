"""Quantized sparse values decode as spec §6.4 says, ``scale * (code + offset - zero)`` in float32,
whichever way the reader computes them (a per-byte table for 1, 2 and 4 bits, arithmetic else)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltahub.format import bitpack
from deltahub.format.components import Sparse


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantized_values_are_the_spec_formula_for_every_width(bits):
    rng = np.random.default_rng(bits)
    nnz = 1001  # not a whole number of bytes at any width but 8
    codes = rng.integers(0, 1 << bits, size=nnz, dtype=np.uint8)
    zero, offset = int(rng.integers(0, 1 << bits)), int(rng.integers(0, 256))
    scale = np.float32(rng.uniform(1e-4, 1e-2))
    meta = {"nnz": nnz, "values": {"bits": bits, "zero": zero, "offset": offset}}
    got = Sparse.values(meta, {"codes": bitpack.pack(codes, bits), "scale": torch.tensor([scale])})
    # Element by element in float32: the integer sum is exact, the product rounds once.
    want = np.array([np.float32(scale) * np.float32(int(c) + offset - zero) for c in codes], dtype=np.float32)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
