"""``deltahub demo``: every method on one delta, with honest ratios, errors and timings.

Runs offline in seconds. The delta is synthetic but shaped like a real fine-tune's: a decaying
singular spectrum plus dense noise, on a bfloat16 weight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .encoding import encode_tensor
from .errors import InfeasibleRatioError
from .methods import list_methods


@dataclass
class DemoRow:
    method: str
    ratio: float
    rel_error: float
    encode_s: float
    decode_s: float
    note: str = ""


def synthetic_pair(rows: int = 512, cols: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base and a fine-tune whose delta has a power-law spectrum plus noise (mean |delta| ~ 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    spectrum = torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    delta = (u * spectrum) @ v.t()
    delta = delta / delta.abs().mean() * 1e-3 + torch.randn(rows, cols, generator=g) * 3e-4
    return base, (base.float() + delta).bfloat16()


def run_demo(ratio: float = 1 / 8, rows: int = 512, cols: int = 1024) -> list[DemoRow]:
    """Encode the synthetic delta with every method; bitdelta, lossless and dense at their natural size.

    >>> rows = run_demo(rows=64, cols=128, ratio=1/4)
    >>> sorted(r.method for r in rows) == sorted(list_methods())
    True
    """
    base, ft = synthetic_pair(rows, cols)
    true = ft.float() - base.float()
    out = []
    for method in list_methods():
        r = None if method in ("bitdelta", "lossless", "dense") else ratio
        t0 = time.perf_counter()
        try:
            enc = encode_tensor("demo.weight", base, ft, method, r)
        except InfeasibleRatioError as e:
            out.append(DemoRow(method, float("nan"), float("nan"), 0.0, 0.0, str(e)))
            continue
        t1 = time.perf_counter()
        dec = enc.decode(base)
        t2 = time.perf_counter()
        err = float((dec.float() - base.float() - true).norm() / true.norm())
        out.append(DemoRow(method, enc.ratio, err, t1 - t0, t2 - t1, "natural size" if r is None else ""))
    return out
