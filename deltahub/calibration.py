"""Calibration for activation-aware compression (``auto --calibration FILE``).

The base model runs once over a calibration text; each linear layer's inputs give
``H = E[x xᵀ]`` (scaled to a mean diagonal of 1), so a tensor's error can be measured where it
matters, on the layer's output: ``E||(Δ̂ - Δ) x||² ∝ tr((Δ̂ - Δ) H (Δ̂ - Δ)ᵀ)``. ``auto`` then uses it three ways, as Delta-CoMe
does with its calibration set: the low-rank part is the best one in that norm (an SVD of
``Δ L`` with ``H = L Lᵀ``), the factor ``V`` is quantized GPTQ-style (Frantar et al., 2023:
each column's rounding error is spread over the columns not yet quantized, through the
Cholesky factor of ``H⁻¹``), and the budget is spread by output error instead of weight error.

When it pays (benchmarks/README.md, "Retention where it is hard"): ``H`` weighs each input
direction by how often the text uses it, so calibration keeps what its text exercises and spends
less on rare directions. On a fine-tune that learned 120 facts and a skill, its own training text
as calibration raised the skill kept at 1/64 (0.955 against 0.920 held-out accuracy) and lost
facts (34% kept against 64%). Use it for a skill or a style, with the fine-tune's own data.

Memory: the base model is loaded once in float32, and one ``q x q`` matrix is kept per linear
layer (layers that read the same input share it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import DeltahubError
from .format.quant import GroupQuant, quantize_groups

DAMP = 0.01  # GPTQ's dampening: a fraction of the mean diagonal added to H, so it inverts


class CalibrationError(DeltahubError, ValueError):
    """The calibration text or model cannot be used."""


@dataclass
class Calibration:
    """``H = E[x xᵀ]`` of each linear layer's input scaled to a mean diagonal of 1, by the name of
    the layer's weight (a layer whose inputs were all zero gets the identity: no direction known).

    Example::

        cal = Calibration.collect("path/to/base", Path("text.txt").read_text(), max_tokens=2048)
        cal.hessian("model.layers.0.mlp.down_proj.weight").shape  # (intermediate, intermediate)
    """

    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def hessian(self, name: str) -> torch.Tensor | None:
        return self.hessians.get(name)

    @classmethod
    def collect(cls, model_path: str | os.PathLike, text: str, *, max_tokens: int = 2048, seq_len: int = 512) -> "Calibration":
        """Run the model at ``model_path`` (a local folder) over ``text`` and gather every linear layer's ``H``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not text.strip():
            raise CalibrationError("the calibration text is empty; give a file of plain text (a few thousand words)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as e:  # transformers raises several types for a missing tokenizer
            raise CalibrationError(f"no tokenizer in {model_path} to read the calibration text ({e}); calibration needs the base's tokenizer files") from None
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model.eval()
        ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
        if ids.numel() < 2:
            raise CalibrationError("the calibration text holds fewer than 2 tokens; give a longer text")
        sums: dict[int, torch.Tensor] = {}  # by id of the input tensor: layers reading one input share one H
        names: dict[str, int] = {}
        hooks = []

        def hook(name: str) -> Callable:
            def fn(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                key = names.setdefault(name, id(module))
                h = sums.get(key)
                sums[key] = x.T @ x if h is None else h + x.T @ x

            return fn

        for mname, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_pre_hook(hook(f"{mname}.weight")))
        try:
            with torch.no_grad():
                for start in range(0, ids.numel(), seq_len):
                    model(input_ids=ids[start : start + seq_len].unsqueeze(0))
        finally:
            for h in hooks:
                h.remove()
        n = int(ids.numel())
        # Each H scaled to a mean diagonal of 1: the weighting then shapes which directions of a
        # tensor's error count, not how much one tensor counts against another. The allocation
        # compares errors across every tensor, the embeddings' measured without H; unscaled, a
        # layer's share followed the size of its inputs (the MLP's down_proj, whose inputs are
        # small, starved). The weighted SVD and GPTQ do not depend on H's scale.
        hessians = {name: _unit_mean_diagonal(name, sums[key] / n).to(torch.float32) for name, key in names.items()}
        return cls(hessians, n)


def _unit_mean_diagonal(name: str, h: torch.Tensor) -> torch.Tensor:
    """``h`` over its mean diagonal; the identity when the inputs were all zero (a layer the text
    never reached, e.g. an expert no token was routed to: nothing is known of its directions)."""
    mean = float(h.diagonal().mean())
    if not math.isfinite(mean) or not torch.isfinite(h).all():
        raise CalibrationError(f"the base's activations at {name} are not finite over the calibration text; the base model overflows in float32 there")
    if mean <= 0:
        return torch.eye(h.shape[0], dtype=h.dtype)
    return h / mean


def cholesky_factor(h: torch.Tensor) -> torch.Tensor:
    """Lower ``L`` with ``L Lᵀ = H + damp``, in float64."""
    hd = h.to(torch.float64)
    return torch.linalg.cholesky(hd + DAMP * float(hd.diagonal().mean().clamp(min=1e-12)) * torch.eye(hd.shape[0], dtype=torch.float64))


def weighted_svd(delta: torch.Tensor, h: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V`` minimizing ``||(U diag(S) Vᵀ - Δ) L||`` over rank ``rank`` (``V`` is not orthonormal)."""
    L = cholesky_factor(h)
    u, s, vh = torch.linalg.svd(delta.to(torch.float64) @ L, full_matrices=False)
    # Δ̂ = U S V'ᵀ L⁻¹, so V = L⁻ᵀ V'
    v = torch.linalg.solve_triangular(L.T, vh[:rank].T, upper=True)
    return u[:, :rank].float(), s[:rank].float(), v.float()


def weighted_singular_values(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    from .methods.linalg import singular_values  # here, not at the top: deltahub.methods imports this module

    return singular_values(delta.to(torch.float64) @ cholesky_factor(h))


def gptq_quantizer(h: torch.Tensor) -> Callable[[torch.Tensor, int, int], GroupQuant]:
    """A quantizer for factor vectors read against inputs with second moment ``h`` (GPTQ order:
    column by column, each rounding error compensated on the later columns)."""
    hinv = torch.cholesky_inverse(cholesky_factor(h))
    chol = torch.linalg.cholesky(hinv, upper=True)  # rows give the compensation directions

    def quantize(x: torch.Tensor, bits: int, group_size: int) -> GroupQuant:
        w = x.to(torch.float64).clone()
        n, q = w.shape
        qmax = (1 << bits) - 1
        sdt = quantize_groups(x, bits, group_size).scale.dtype  # one scale dtype for the whole factor
        codes = torch.empty(n, q, dtype=torch.uint8)
        scales, zeros = [], []
        for g0 in range(0, q, group_size):
            g1 = min(q, g0 + group_size)
            block = w[:, g0:g1]  # a view: updates land in w
            gq = quantize_groups(block.float(), bits, g1 - g0, scale_dtype=sdt)
            scale = gq.scale.to(torch.float64)
            zero = gq.zero.to(torch.float64)
            errs = torch.empty(n, g1 - g0, dtype=torch.float64)
            for j in range(g1 - g0):
                c = (torch.round(block[:, j : j + 1] / scale) + zero).clamp(0, qmax)
                err = (block[:, j : j + 1] - scale * (c - zero)) / chol[g0 + j, g0 + j]
                block[:, j + 1 :] -= err * chol[g0 + j, g0 + j + 1 : g1]
                errs[:, j : j + 1] = err
                codes[:, g0 + j] = c[:, 0].to(torch.uint8)
            # The group's errors reach the later columns in one product (GPTQ's lazy batch update).
            w[:, g1:] -= errs @ chol[g0:g1, g1:]
            scales.append(gq.scale)
            zeros.append(gq.zero)
        return GroupQuant(codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1))

    return quantize


# A token of the byte-level BPE tokenizers covers at least one byte and rarely more than a few
# dozen (runs of spaces or digits); reading this many bytes a token holds every token a
# calibration asks for without reading a whole file that may be gigabytes.
BYTES_PER_TOKEN = 64


def read_text(path: str | os.PathLike, max_tokens: int = 2048) -> str:
    """The first ``max_tokens * BYTES_PER_TOKEN`` bytes of the UTF-8 text file at ``path``
    (enough for ``max_tokens`` tokens): a calibration file is read no further than it is used.

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(f, "w").write("It is a truth.")
    >>> read_text(f, max_tokens=2048)
    'It is a truth.'
    """
    p = Path(path)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise CalibrationError(f"calibration_tokens must be an integer of at least 2, got {max_tokens!r}")
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist; give a plain-text file")
    limit = max_tokens * BYTES_PER_TOKEN
    with open(p, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        # Cut at the limit, and drop a character the cut split (at most 3 continuation bytes).
        data = data[:limit]
        for back in range(min(4, len(data))):
            if data[len(data) - 1 - back] & 0xC0 != 0x80:  # the last character's first byte
                width = _utf8_width(data[len(data) - 1 - back])
                if width > back + 1:
                    data = data[: len(data) - 1 - back]
                break
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"calibration file {p} is not UTF-8 text") from None


def _utf8_width(first: int) -> int:
    """How many bytes a UTF-8 character that starts with byte ``first`` takes (1 for a bad byte)."""
    return 2 if first >> 5 == 0b110 else 3 if first >> 4 == 0b1110 else 4 if first >> 3 == 0b11110 else 1
