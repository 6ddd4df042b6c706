"""Is an in-memory model the base a delta was made against? (spec/FORMAT.md §4.2)

``sources.check_base`` compares a base *checkpoint* with the delta's recorded fingerprint and
sample digests. A model handed to ``DeltaModel.from_base`` has no checkpoint: its tensor names,
shapes and sampled rows are compared instead, with the same sample digests
(``checkpoint.sample_digest``), computed from the tensors in memory, and the same error message.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..checkpoint import sample_digest
from ..format import DeltaReader
from ..format.dtypes import to_torch
from ..sources import raise_base_mismatch, require_fingerprint


def model_base_differences(reader: DeltaReader, lookup: Callable[[str], torch.Tensor | None], limit: int = 5) -> list[str]:
    """Differences between the tensors ``lookup`` finds in a model and the base the delta
    records: shapes of the tensors the delta changes, then the recorded sample digests (a
    tensor counts as equal when its bytes match in its own dtype or in the record's dtype, so
    a bf16 base loaded in float32 still matches)."""
    diffs: list[str] = []
    for name, rec in reader.records.items():
        if rec["kind"] in ("added", "removed"):
            continue
        t = lookup(name)
        if t is None:
            continue
        want = tuple(rec.get("base_shape") or rec["shape"])
        if tuple(t.shape) != want:
            diffs.append(f"{name}: shape {list(t.shape)} in the model, the delta expects {list(want)}")
            if len(diffs) >= limit:
                return diffs
    samples = reader.config.get("base", {}).get("samples") or {}
    for name, digest in samples.items():
        t = lookup(name)
        if t is None or t.device.type == "meta" or (name in reader.records and tuple(t.shape) != tuple(reader.records[name].get("base_shape") or reader.records[name]["shape"])):
            continue
        dtypes = [t.dtype]
        if name in reader.records:
            dtypes.append(to_torch(reader.records[name]["dtype"]))
        if all(sample_digest(t, d) != digest for d in dict.fromkeys(dtypes)):
            diffs.append(f"{name}: same shape but other weights")
            if len(diffs) >= limit:
                break
    return diffs


def check_model_base(reader: DeltaReader, lookup: Callable[[str], torch.Tensor | None], what: str) -> None:
    """Raise :class:`BaseMismatchError` naming the differences if the model is not the delta's
    base, or if the delta records no base fingerprint (as ``sources.check_base`` does)."""
    remedy = "Wrap the right base, or pass verify_base=False to load anyway."
    require_fingerprint(reader, what, remedy)
    raise_base_mismatch(reader, what, model_base_differences(reader, lookup), remedy)
