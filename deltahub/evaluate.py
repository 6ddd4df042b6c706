"""``deltahub eval``: what compression costs a fine-tune.

Two measurements:

- per tensor, the relative Frobenius error of the decoded delta against the true delta,
  ``||decoded - finetuned|| / ||finetuned - base||``, with the worst tensors and a total;
- on a text, the mean negative log-likelihood per token (and perplexity) of the base, the
  fine-tune and base + decoded delta, and the performance retention
  ``PR = (NLL_base - NLL_delta) / (NLL_base - NLL_ft)``: the papers' retention metric applied
  to held-out loss (1 keeps the whole gain of fine-tuning, 0 keeps none).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from .progress import progress as progress_bar

from .checkpoint import Checkpoint, borrow_base
from .format.records import describe_record
from .sources import HubOptions, open_pair


@dataclass
class TensorError:
    name: str
    kind: str
    method: str | None
    rel_error: float
    delta_norm: float
    holds: str = ""  # what the record stores (format.records.describe_record)


@dataclass
class TextScore:
    tokens: int
    nll_base: float
    nll_finetuned: float
    nll_delta: float

    @property
    def ppl_base(self) -> float:
        return math.exp(self.nll_base)

    @property
    def ppl_finetuned(self) -> float:
        return math.exp(self.nll_finetuned)

    @property
    def ppl_delta(self) -> float:
        return math.exp(self.nll_delta)

    @property
    def retention(self) -> float:
        """PR = (NLL_base - NLL_delta) / (NLL_base - NLL_ft); NaN when fine-tuning gained nothing."""
        gain = self.nll_base - self.nll_finetuned
        return (self.nll_base - self.nll_delta) / gain if gain else float("nan")


@dataclass
class EvalReport:
    delta: str
    tensors: list[TensorError] = field(default_factory=list)
    text: TextScore | None = None

    @property
    def total_rel_error(self) -> float:
        """sqrt(sum of squared errors) / sqrt(sum of squared deltas), over compressed and dense tensors."""
        err = sum((t.rel_error * t.delta_norm) ** 2 for t in self.tensors if math.isfinite(t.rel_error))
        ref = sum(t.delta_norm**2 for t in self.tensors)
        return math.sqrt(err / ref) if ref else 0.0

    @property
    def mean_rel_error(self) -> float:
        errs = [t.rel_error for t in self.tensors if t.kind in ("dense", "compressed") and math.isfinite(t.rel_error)]
        return sum(errs) / len(errs) if errs else 0.0

    def worst(self, n: int = 10) -> list[TensorError]:
        return sorted((t for t in self.tensors if math.isfinite(t.rel_error)), key=lambda t: -t.rel_error)[:n]

    def to_dict(self) -> dict:
        out = {
            "delta": self.delta,
            "total_rel_error": self.total_rel_error,
            "mean_rel_error": self.mean_rel_error,
            "worst": [asdict(t) for t in self.worst()],
            "tensors": [asdict(t) for t in self.tensors],
        }
        if self.text is not None:
            t = self.text
            out["text"] = {**asdict(t), "ppl_base": t.ppl_base, "ppl_finetuned": t.ppl_finetuned, "ppl_delta": t.ppl_delta, "retention": t.retention}
        return out


def tensor_errors(delta: str | os.PathLike, finetuned: str | os.PathLike, base: str | os.PathLike | None = None, *, progress: bool = True, hub: HubOptions | None = None) -> list[TensorError]:
    """Relative error of every decoded tensor against the true fine-tune, streamed one tensor at a time."""
    reader, base_ckpt = open_pair(delta, base, hub=hub)
    ft = Checkpoint.open(finetuned, **(hub or HubOptions()).kwargs())
    out = []
    for name, rec in progress_bar(list(reader.records.items()), desc="Tensor errors", enabled=progress):
        if rec["kind"] == "removed" or name not in ft:
            continue
        with borrow_base(base_ckpt, name) as b, ft.borrow(name) as f:
            f = f.to(torch.float32)
            dec = reader.decode(name, b).to(torch.float32)
            ref = f - (b.to(torch.float32) if b is not None and b.shape == f.shape else 0.0)
            norm = float(ref.norm())
            err = float((dec - f).norm())
        out.append(TensorError(name, rec["kind"], rec.get("method"), err / norm if norm else (0.0 if err == 0 else math.inf), norm, describe_record(rec)))
    return out


@torch.no_grad()
def mean_nll(model, input_ids: torch.Tensor, window: int = 512, progress: bool = False, desc: str = "NLL") -> float:
    """Mean next-token negative log-likelihood (nats) over non-overlapping windows of ``input_ids``."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in progress_bar(range(0, input_ids.numel() - 1, window), desc=desc, enabled=progress):
        chunk = input_ids[start : start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0].float()
        total += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return total / count


def default_text() -> str:
    """The public-domain text shipped with deltahub (Jane Austen, via the janeaustenr R package)."""
    return (Path(__file__).parent / "data" / "austen_excerpt.txt").read_text()


def evaluate(
    delta: str | os.PathLike,
    finetuned: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    max_tokens: int = 4096,
    window: int = 512,
    with_text: bool = True,
    progress: bool = True,
    token: str | bool | None = None,
) -> EvalReport:
    """Per-tensor errors and, on ``text`` (default: the shipped Austen excerpt), NLL/PPL/PR.

    Models are loaded one at a time (base, fine-tune, base + delta) to keep memory at one model.

    Example::

        report = deltahub.evaluate("my-delta", finetuned="Qwen/Qwen2.5-0.5B-Instruct")
        print(report.text.retention)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import DeltaModel

    hub = HubOptions(token)
    report = EvalReport(str(delta), tensor_errors(delta, finetuned, base, progress=progress, hub=hub))
    if not with_text:
        return report
    reader, base_ckpt = open_pair(delta, base, hub=hub, verify_base=False)
    tok = AutoTokenizer.from_pretrained(str(Checkpoint.open(finetuned, **hub.kwargs()).path))
    ids = tok(text if text is not None else default_text(), return_tensors="pt").input_ids[0][: max_tokens + 1]
    scores = {}
    for label, loader in (
        ("base", lambda: AutoModelForCausalLM.from_pretrained(str(base_ckpt.path))),
        ("finetuned", lambda: AutoModelForCausalLM.from_pretrained(str(Checkpoint.open(finetuned, **hub.kwargs()).path))),
        ("delta", lambda: DeltaModel.from_pretrained(reader.path, base=base_ckpt.path, verify_base=False)),
    ):
        model = loader()
        scores[label] = mean_nll(model, ids, window, progress, desc=f"NLL {label}")
        del model
        gc.collect()
    report.text = TextScore(int(ids.numel() - 1), scores["base"], scores["finetuned"], scores["delta"])
    return report
