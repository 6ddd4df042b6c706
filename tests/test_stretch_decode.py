"""Decoding a tensor a stretch at a time (records.sum_components) gives the spec's sum exactly.

The reference here follows spec §5.4 literally: the float32 base, then each component's whole
``P`` added in component order, then one cast. Low-rank factors are dyadic, so every summation
order of the product is exact and the comparison can be bit for bit.
"""

from __future__ import annotations

import threading

import pytest
import torch

from deltahub.format import prng, records
from deltahub.format.components import Segment, Sparse, component_type, encode_dense, encode_lowrank, encode_sign, encode_sparse
from deltahub.format.records import decode_record, make_record

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def _dyadic(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-8, 9, shape, generator=g).to(torch.float32) / 64


def _components(shape: tuple[int, ...], g: torch.Generator) -> list:
    """One component of every kind, some over a block of rows, on the [n, h, f] tensor ``shape``."""
    n, h, f = shape
    comps = []
    sign = encode_sign(torch.randn(n * h, f, generator=g), per_row=True)
    comps.append(sign)
    u, v = _dyadic((h * 6, 3), g), _dyadic((f, 3), g)
    low = encode_lowrank(u, torch.tensor([2.0, 0.5, 0.25]), v, [Segment(0, 3, dtype="F32")])
    low.meta["rows"] = [2, 8]  # dimension-0 rows 2..8 of the tensor: 6 * h matrix rows
    comps.append(low)
    mask = torch.rand(n * h, f, generator=g) < 0.3
    vals = torch.randn(int(mask.sum()), generator=g) * 1e-3
    vals[:50] = -0.0  # stored negative zeros: -0.0 + -0.0 keeps the sign
    comps.append(encode_sparse(mask, vals, index="csr", value_dtype=torch.float32))
    seed = 0x5EED
    gmask = prng.group_mask(seed, n * h, f, 16, 3)
    comps.append(encode_sparse(gmask, torch.randn(int(gmask.sum()), generator=g), index="seeded", seed=seed, mask_meta={"kind": "group", "group_size": 16, "keep": 3}, value_dtype=torch.float16))
    t = prng.bernoulli_threshold(seed + 1, (n - 1) * h * f, 5_000)
    bmask = prng.bernoulli_mask(seed + 1, (n - 1) * h, f, t)
    codes = torch.randint(0, 16, (int(bmask.sum()),), dtype=torch.uint8, generator=g)
    bern = encode_sparse(bmask, None, index="seeded", seed=seed + 1, mask_meta={"kind": "bernoulli", "threshold": t}, codes=codes, bits=4, scale=1e-3, zero=8)
    bern.meta["rows"] = [1, n]
    comps.append(bern)
    dense = encode_dense(torch.randn(2, h, f, generator=g) * 1e-3, torch.bfloat16)
    dense.meta["rows"] = [n - 2, n]
    comps.append(dense)
    return comps


def _spec_reference(base: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, comps) -> torch.Tensor:
    acc = base.to(torch.float32).clone()
    for c in comps:
        ctype = component_type(c.type)
        r0, r1 = c.meta.get("rows", [0, shape[0]])
        block = (r1 - r0, *shape[1:])
        p, q = ctype.view(c.meta, block)
        if c.type == "sparse":  # +0.0 where nothing is stored (spec §5.4 step 7)
            part = torch.zeros(p * q)
            part[Sparse.flat_positions(c.meta, c.tensors, p, q)] = Sparse.values(c.meta, c.tensors)
        elif c.type == "lowrank":
            part = ctype.decode(c.meta, c.tensors, block)  # dyadic: exact in any order
        elif c.type == "dense":
            part = c.tensors["values"].to(torch.float32)
        else:
            part = ctype.decode(c.meta, c.tensors, block)
        acc[r0:r1] = acc[r0:r1] + part.reshape(block)
    return acc.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stretches_give_the_spec_sum_bit_for_bit(dtype):
    # 10 x 64 x 600 = 384K elements: two stretches, cut inside dimension-0 rows.
    shape = (10, 64, 600)
    g = torch.Generator().manual_seed(0)
    comps = _components(shape, g)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    base.view(-1)[::97] = -0.0  # a base -0.0 becomes +0.0 where a sparse part adds +0.0
    record, tensors = make_record("compressed", shape, "BF16" if dtype == torch.bfloat16 else "F32", comps)
    got = decode_record("w", record, lambda k: tensors[k.split("::", 1)[1]], base.clone())
    want = _spec_reference(base, shape, dtype, comps)
    assert torch.equal(_bits(got), _bits(want))
    assert records._STRETCH < got.numel()  # the test spans several stretches


@pytest.mark.parametrize("index", ["csr", "group", "bernoulli"])
def test_sparse_parts_keep_the_sign_of_zero_as_the_spec_sums(index):
    """-0.0 + +0.0 = +0.0 where nothing is stored; -0.0 + -0.0 = -0.0 where a -0.0 is stored."""
    p, q, seed = 600, 512, 11
    mask = {"csr": torch.rand(p, q, generator=torch.Generator().manual_seed(3)) < 0.2,
            "group": prng.group_mask(seed, p, q, 8, 2),
            "bernoulli": prng.bernoulli_mask(seed, p, q, 1 << 50)}[index]
    values = torch.full((int(mask.sum()),), -0.0)
    values[1::2] = 1.0
    meta = {"csr": {}, "group": {"kind": "group", "group_size": 8, "keep": 2}, "bernoulli": {"kind": "bernoulli", "threshold": 1 << 50}}[index]
    comp = encode_sparse(mask, values, index="csr" if index == "csr" else "seeded", seed=seed, mask_meta=meta or None, value_dtype=torch.float32)
    base = torch.full((p, q), -0.0)
    record, tensors = make_record("compressed", (p, q), "F32", [comp])
    got = decode_record("w", record, lambda k: tensors[k.split("::", 1)[1]], base)
    want = torch.zeros(p, q)  # +0.0 where nothing is stored
    want[mask] = values + -0.0  # -0.0 stays -0.0, 1.0 stays 1.0
    assert torch.equal(_bits(got), _bits(want))
    assert int(torch.signbit(got).sum()) == (values.numel() + 1) // 2 > 0


def test_a_custom_view_decodes_as_one_stretch():
    # view [300, 1280]: matrix rows do not line up with rows of dimension 0 (width 640).
    shape = (600, 640)
    g = torch.Generator().manual_seed(1)
    comp = encode_sign(torch.randn(300, 1280, generator=g))
    comp.meta["view"] = [300, 1280]
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    record, tensors = make_record("compressed", shape, "BF16", [comp])
    got = decode_record("w", record, lambda k: tensors[k.split("::", 1)[1]], base)
    want = (base.float() + component_type("sign").decode(comp.meta, comp.tensors, shape).reshape(shape)).to(torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["compressed", "unchanged", "added"])
def test_a_decoded_tensor_never_shares_memory_with_its_inputs(kind):
    # The base and the stored tensors may be views of files that are only borrowed.
    shape = (700, 512)
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    comps = {"compressed": [encode_sign(torch.randn(shape, generator=g))], "unchanged": None, "added": [encode_dense(base.clone(), torch.bfloat16)]}[kind]
    record, tensors = make_record(kind, shape, "BF16", comps)
    kept = base.clone()
    got = decode_record("w", record, lambda k: tensors[k.split("::", 1)[1]], base)
    inputs = [base, *tensors.values()]
    assert torch.equal(base, kept)
    assert not any(got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs)


def test_group_mask_rows_from_an_offset_are_the_same_key_stream():
    whole = prng.group_mask(77, 9, 50, 8, 3)
    assert torch.equal(prng.group_mask(77, 4, 50, 8, 3, row0=5), whole[5:])


def test_a_bernoulli_part_takes_its_rows_in_order():
    t = prng.bernoulli_threshold(3, 64 * 64, 500)
    mask = prng.bernoulli_mask(3, 64, 64, t)
    comp = encode_sparse(mask, torch.ones(int(mask.sum())), index="seeded", seed=3, mask_meta={"kind": "bernoulli", "threshold": t}, value_dtype=torch.float32)
    adder = Sparse.row_adder(comp.meta, comp.tensors, (64, 64))
    with pytest.raises(ValueError, match="in order"):
        adder.add(torch.zeros(8, 64), 8, 16)


@pytest.mark.parametrize("share", [1, 3])
def test_a_pool_thread_decodes_on_its_share_of_the_cores_and_restores_its_setting(share):
    from deltahub.model import _threads_unless_in

    seen = []
    caller = threading.current_thread()

    def work():
        torch.set_num_threads(2)
        with _threads_unless_in(caller, share):
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    with _threads_unless_in(caller, share):
        assert torch.get_num_threads() == before  # the loading thread itself is left alone
    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert seen == [share, 2] and torch.get_num_threads() == before
