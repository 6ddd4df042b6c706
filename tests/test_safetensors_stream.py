"""SafetensorsStreamWriter: spooled and planned writes give the same files safetensors reads."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltahub.format.safetensors_stream import SafetensorsStreamWriter

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
