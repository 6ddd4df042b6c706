"""``deltahub eval``: what compression costs a fine-tune.

Two measurements:

- per tensor, the relative Frobenius error of the decoded delta against the true delta,
  ``||decoded - finetuned|| / ||finetuned - base||``, with the worst tensors and a total;
- on a text, the mean negative log-likelihood per token (and perplexity) of the base, the
  fine-tune and base + decoded delta, and the performance retention
  ``PR = (NLL_base - NLL_delta) / (NLL_base - NLL_ft)``: the papers' retention metric applied
  to held-out loss (1 keeps the whole gain of fine-tuning, 0 keeps none).

Without the fine-tune (someone who only pulled a delta), only the second half can be measured and
only for base and base + delta: the per-tensor errors and PR need the true fine-tune, so they are
``None`` in the report and its text says why.
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
from .errors import DeltahubError
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
    """Mean NLL per token (nats) of each model on the same tokens; ``nll_finetuned`` is None when
    the fine-tune was not given, and so are ``ppl_finetuned`` and ``retention``."""

    tokens: int
    nll_base: float
    nll_finetuned: float | None
    nll_delta: float

    @property
    def ppl_base(self) -> float:
        return math.exp(self.nll_base)

    @property
    def ppl_finetuned(self) -> float | None:
        return None if self.nll_finetuned is None else math.exp(self.nll_finetuned)

    @property
    def ppl_delta(self) -> float:
        return math.exp(self.nll_delta)

    @property
    def retention(self) -> float | None:
        """PR = (NLL_base - NLL_delta) / (NLL_base - NLL_ft); NaN when fine-tuning gained nothing,
        None without the fine-tune."""
        if self.nll_finetuned is None:
            return None
        gain = self.nll_base - self.nll_finetuned
        return (self.nll_base - self.nll_delta) / gain if gain else float("nan")


@dataclass
class EvalReport:
    """What :func:`evaluate` measured. Without the fine-tune (``finetuned is None``) there are no
    tensor errors: ``tensors`` is empty, and ``total_rel_error``, ``mean_rel_error``, the text's
    ``nll_finetuned`` and ``retention`` are None. ``str(report)`` is a plain-text summary."""

    delta: str
    tensors: list[TensorError] = field(default_factory=list)
    text: TextScore | None = None
    finetuned: str | None = None  # what the delta was compared with; None: no fine-tune given

    @property
    def total_rel_error(self) -> float | None:
        """sqrt(sum of squared errors) / sqrt(sum of squared deltas), over compressed and dense tensors."""
        if self.finetuned is None:
            return None
        err = sum((t.rel_error * t.delta_norm) ** 2 for t in self.tensors if math.isfinite(t.rel_error))
        ref = sum(t.delta_norm**2 for t in self.tensors)
        return math.sqrt(err / ref) if ref else 0.0

    @property
    def mean_rel_error(self) -> float | None:
        if self.finetuned is None:
            return None
        errs = [t.rel_error for t in self.tensors if t.kind in ("dense", "compressed") and math.isfinite(t.rel_error)]
        return sum(errs) / len(errs) if errs else 0.0

    def worst(self, n: int = 10) -> list[TensorError]:
        return sorted((t for t in self.tensors if math.isfinite(t.rel_error)), key=lambda t: -t.rel_error)[:n]

    def to_dict(self) -> dict:
        measured = self.finetuned is not None
        out = {
            "delta": self.delta,
            "finetuned": self.finetuned,
            "total_rel_error": self.total_rel_error,
            "mean_rel_error": self.mean_rel_error,
            "worst": [asdict(t) for t in self.worst()] if measured else None,
            "tensors": [asdict(t) for t in self.tensors] if measured else None,
        }
        if self.text is not None:
            t = self.text
            out["text"] = {**asdict(t), "ppl_base": t.ppl_base, "ppl_finetuned": t.ppl_finetuned, "ppl_delta": t.ppl_delta, "retention": t.retention}
        return out

    def __str__(self) -> str:
        lines = [f"delta {self.delta}"]
        if self.finetuned is None:
            lines.append("per-tensor errors and PR: not measured (they need the fine-tune; pass finetuned= / --finetuned)")
        else:
            lines.append(f"compared with the fine-tune {self.finetuned}")
            for t in self.worst(5):
                lines.append(f"  {t.name}  {t.kind}  {t.method or ''}  relative error {t.rel_error:.4f}")
            lines.append(f"relative error of the whole delta: {self.total_rel_error:.4f} (mean over tensors {self.mean_rel_error:.4f})")
        if self.text is not None:
            s = self.text
            lines.append(f"held-out text, {s.tokens} tokens: NLL / token (perplexity)")
            rows = [("base", s.nll_base), ("fine-tune", s.nll_finetuned), ("base + delta", s.nll_delta)]
            lines += [f"  {label:13s} {nll:.4f} ({math.exp(nll):.3f})" for label, nll in rows if nll is not None]
            if s.retention is not None:
                lines.append(f"performance retention PR = {s.retention:.4f}")
        return "\n".join(lines)


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
    finetuned: str | os.PathLike | None = None,
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
    With ``finetuned=None`` only base and base + delta are scored on the text (the delta's base
    is checked against its fingerprint first); the fields that need the fine-tune are None.
    ``with_text=False`` then leaves nothing to measure and raises ``ValueError``.

    Example::

        report = deltahub.evaluate("my-delta", finetuned="Qwen/Qwen2.5-0.5B-Instruct")
        print(report.text.retention)
        print(deltahub.evaluate("user/my-delta"))  # base against base + delta only
    """
    from transformers import AutoModelForCausalLM

    from .model import DeltaModel

    if finetuned is None and not with_text:
        raise ValueError("nothing to measure: the per-tensor errors need the fine-tune (pass finetuned=, or with_text=True to score base and base + delta)")
    hub = HubOptions(token)
    if finetuned is None:
        report = EvalReport(str(delta))
        reader, base_ckpt = open_pair(delta, base, hub=hub)  # no tensor pass checked the base: check it here
    else:
        report = EvalReport(str(delta), tensor_errors(delta, finetuned, base, progress=progress, hub=hub), finetuned=str(finetuned))
        if not with_text:
            return report
        reader, base_ckpt = open_pair(delta, base, hub=hub, verify_base=False)
    ft_path = None if finetuned is None else Checkpoint.open(finetuned, **hub.kwargs()).path
    tok = _tokenizer(ft_path, reader.path, base_ckpt.path)
    ids = tok(text if text is not None else default_text(), return_tensors="pt").input_ids[0][: max_tokens + 1]
    loaders = {
        "base": lambda: AutoModelForCausalLM.from_pretrained(str(base_ckpt.path)),
        "finetuned": lambda: AutoModelForCausalLM.from_pretrained(str(ft_path)),
        "delta": lambda: DeltaModel.from_pretrained(reader.path, base=base_ckpt.path, verify_base=False),
    }
    if ft_path is None:
        del loaders["finetuned"]
    scores = {}
    for label, loader in loaders.items():
        model = loader()
        scores[label] = mean_nll(model, ids, window, progress, desc=f"NLL {label}")
        del model
        gc.collect()
    report.text = TextScore(int(ids.numel() - 1), scores["base"], scores.get("finetuned"), scores["delta"])
    return report


def _tokenizer(finetuned: Path | None, delta: Path, base: Path):
    """The fine-tune's tokenizer: from the fine-tune if given and it has one, else the delta repo's
    copy, else the base's."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    folder = next((Path(f) for f in (finetuned, delta, base) if f is not None and any((Path(f) / n).is_file() for n in names)), None)
    if folder is None:
        # transformers would answer with advice about sentencepiece; the cause is simpler.
        raise DeltahubError("scoring a text needs a tokenizer, and neither the fine-tune, the delta nor the base has tokenizer files; add them to the base or the delta, or measure the tensors only (with_text=False; CLI: --tensors-only --finetuned ...)")
    return AutoTokenizer.from_pretrained(str(folder))
