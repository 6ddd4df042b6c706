"""SafetensorsStreamWriter writes the files safetensors writes; MappedSafetensors reads them."""

from __future__ import annotations

import hashlib
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltahub.errors import FormatError
from deltahub.format.safetensors_stream import MappedSafetensors, SafetensorsStreamWriter

TENSORS = {
    "a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    "b": torch.tensor([], dtype=torch.float32),
    "c": torch.ones(5, dtype=torch.uint8),
    "d": torch.tensor(3.5, dtype=torch.float16),
}


def _layout():
    return [(k, t.dtype, tuple(t.shape)) for k, t in TENSORS.items()]


@pytest.mark.parametrize("planned", [False, True])
def test_writes_what_safetensors_writes(tmp_path, planned):
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", layout=_layout() if planned else None)
    for k, t in TENSORS.items():
        w.add(k, t)
    digest = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert digest == hashlib.sha256(data).hexdigest()
    save_file(TENSORS, tmp_path / "ref.safetensors")
    got, ref = load_file(tmp_path / "x.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors", "x.safetensors"]  # no spool left


def test_planned_and_spooled_files_are_identical(tmp_path):
    for name, layout in (("spool", None), ("plan", _layout())):
        w = SafetensorsStreamWriter(tmp_path / name, metadata={"format": "pt"}, layout=layout, checksum=False)
        for k, t in TENSORS.items():
            w.add(k, t)
        assert w.close() is None
    assert (tmp_path / "spool").read_bytes() == (tmp_path / "plan").read_bytes()


def test_a_planned_writer_refuses_what_it_did_not_plan(tmp_path):
    w = SafetensorsStreamWriter(tmp_path / "x", layout=_layout())
    with pytest.raises(ValueError, match="not the next one"):
        w.add("b", TENSORS["b"])  # out of order
    with pytest.raises(ValueError, match="not the next one"):
        w.add("a", TENSORS["a"].float())  # another dtype
    w.add("a", TENSORS["a"])
    with pytest.raises(ValueError, match="never added"):
        w.close()
    assert not (tmp_path / "x").exists()  # no file that looks complete


def test_mapped_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = MappedSafetensors(tmp_path / "x.safetensors")
    assert sorted(f.keys()) == sorted(TENSORS) and f.metadata == {"format": "pt"}
    for k, t in TENSORS.items():
        assert f.info(k) == ({torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.float16: "F16"}[t.dtype], tuple(t.shape))
        with f.borrow(k) as view:
            assert view.dtype == t.dtype and torch.equal(view, t)
        f.get(k).fill_(7)
        with f.borrow(k) as again:  # get() was a copy: the file's bytes are untouched
            assert torch.equal(again, t)


def _rss_file_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident file pages from /proc")
def test_a_borrowed_tensor_leaves_nothing_resident(tmp_path):
    big = torch.randn(16 << 20)  # 64 MiB
    save_file({"big": big, "small": torch.ones(3)}, tmp_path / "x.safetensors")
    f = MappedSafetensors(tmp_path / "x.safetensors")
    before = _rss_file_kib()
    with f.borrow("big") as view:
        assert float(view.sum()) == pytest.approx(float(big.sum()), rel=1e-4)
        during = _rss_file_kib()
    after = _rss_file_kib()
    assert during - before > 60 << 10  # every page of the tensor was mapped in
    assert after - before < 1 << 10  # and given back


def _corrupt(path, data: bytes):
    path.write_bytes(data)
    return path


def test_mapped_refuses_broken_files(tmp_path):
    save_file({"a": torch.ones(1000)}, tmp_path / "ok.safetensors")
    good = (tmp_path / "ok.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    cases = {
        "truncated": (good[:-100], "past the end of the file"),
        "empty": (b"", "bad header length"),
        "huge header": (struct.pack("<Q", 1 << 40) + good[8:], "bad header length"),
        "not json": (good[:8] + b"{" * n + good[8 + n :], "malformed safetensors header"),
        "wrong size": (good[:8] + good[8 : 8 + n].replace(b"[1000]", b"[999] ") + good[8 + n :], "holds 4000 bytes"),
    }
    for what, (data, message) in cases.items():
        with pytest.raises(FormatError, match=message):
            MappedSafetensors(_corrupt(tmp_path / f"{what}.safetensors", data))


def test_an_unaligned_tensor_is_read_as_an_aligned_copy(tmp_path):
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors")
    w.add("codes", torch.arange(3, dtype=torch.uint8))  # the next tensor starts 3 bytes in
    w.add("scales", torch.tensor([1.5, -2.25, 3.0]))
    w.close()
    f = MappedSafetensors(tmp_path / "x.safetensors")
    with f.borrow("scales") as t:
        assert t.data_ptr() % 4 == 0 and t.tolist() == [1.5, -2.25, 3.0]
