"""``deltahub demo``: the whole story on a small model, offline, in about a minute.

A small Llama-style base is trained on the opening of *Sense and Sensibility* and fine-tuned on
the opening of *Pride and Prejudice* (texts shipped in ``deltahub/data``, public domain). The
fine-tune is compressed with every method; each delta is scored by its honest ratio, the
relative error of the whole delta, the performance retention PR on held-out Austen text, and
its compress time. Then the default delta is loaded with ``DeltaModel.from_pretrained`` and, from
one line of *Pride and Prejudice*, the base and base + delta each continue it greedily and give
the probability of the line's next words: the fine-tune's effect, visible against the base's.

``str(result)`` (or :meth:`DemoResult.notes` and :meth:`DemoResult.comparison`) explains what a
newcomer needs to read the table: PR, its values above 1 or below 0, and the natural-size rows.
Third-party progress bars are silenced for the whole run (:func:`deltahub.progress.quiet_third_party`).
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from .progress import progress as progress_bar

from .compress import compress
from .errors import InfeasibleRatioError
from .evaluate import default_text, mean_nll
from .methods import list_methods
from .model import DeltaModel
from .progress import quiet_third_party

DATA = Path(__file__).parent / "data"
NATURAL_SIZE = ("bitdelta", "lossless", "dense")
# Words the fine-tune read many times (Pride and Prejudice's "My dear Mr. Bennet") and the base
# never did (its text is Sense and Sensibility: Dashwoods, no Bennets). The base and base + delta
# continue PROMPT, and the probability each gives CONTINUATION next shows what the delta carries:
# on the default pair, base 1.7e-7 against the fine-tune's 6.0e-2 (measured on the fine-tune itself,
# not a delta). Whole sentences are beyond models this small.
PROMPT = '"My dear Mr.'
CONTINUATION = " Bennet"
SAMPLE_TOKENS = 8
REPETITION_PENALTY = 1.3  # greedy decoding of so small a model otherwise repeats one word


@dataclass
class DemoRow:
    method: str
    ratio: float
    rel_error: float
    retention: float
    compress_s: float
    note: str = ""


@dataclass
class DemoResult:
    rows: list[DemoRow]
    nll_base: float
    nll_finetuned: float
    sample: str
    work_dir: Path
    sampled_from: str = "auto"  # the method of the delta that generated ``sample``
    prompt: str = PROMPT
    sample_base: str = ""  # the base's greedy continuation of ``prompt``
    sample_delta: str = ""  # base + delta's (``sample`` is ``prompt`` followed by it)
    continuation: str = CONTINUATION
    p_base: float = math.nan  # probability of ``continuation`` after ``prompt``, by the base
    p_delta: float = math.nan  # ... and by base + delta

    @property
    def gain(self) -> float:
        """What fine-tuning gained on the held-out text, in nats per token (PR's denominator)."""
        return self.nll_base - self.nll_finetuned

    def notes(self) -> list[str]:
        """Footnotes for the table: what PR means, why it can leave [0, 1], the natural-size rows."""
        gain = self.gain
        out = [
            f"PR (performance retention) = (NLL base - NLL base+delta) / (NLL base - NLL fine-tune), on held-out Austen text: "
            f"the share of the fine-tune's gain ({gain:.3f} nats/token here) that base + delta keeps. 1 keeps all of it, 0 none.",
        ]
        if gain > 0:
            out.append(f"The gain is small, so PR is sensitive: a delta whose error costs 0.01 nats/token moves PR by {0.01 / gain:.2f}. "
                       "PR above 1: base + delta scores better than the fine-tune itself; below 0: worse than the base, "
                       "the compression error costing more than fine-tuning gained.")
        low = [r for r in self.rows if r.retention == r.retention and r.retention < 0]
        if low:
            out.append("Below 0 here: " + ", ".join(f"{r.method} ({r.retention:.1f})" for r in low)
                       + ": their compression error costs more held-out loss than this small fine-tune gained.")
        natural = [r.method for r in self.rows if r.note == "natural size"]
        if natural:
            out.append(f"natural size ({', '.join(natural)}): methods with no target ratio; their row shows the size they reach by "
                       "construction (bitdelta: one sign bit per weight and a scale; lossless: exact).")
        return out

    def comparison(self) -> list[str]:
        """The fine-tune's effect against the base's, on one line of Pride and Prejudice."""
        return [
            f"The fine-tune read Pride and Prejudice, the base did not. From {self.prompt!r}, greedy, {SAMPLE_TOKENS} tokens:",
            f"  base:          {self.prompt}{self.sample_base}",
            f"  base + delta:  {self.prompt}{self.sample_delta}    (DeltaModel, {self.sampled_from} delta)",
            f"Probability of {self.continuation!r} next: base {self.p_base:.1e}, base + delta {self.p_delta:.1e}"
            + (f" ({self.p_delta / self.p_base:,.0f} times the base's)." if self.p_base > 0 and self.p_delta >= self.p_base else "."),
        ]

    def __str__(self) -> str:
        head = f"NLL per token on held-out Austen text: base {self.nll_base:.3f}, fine-tune {self.nll_finetuned:.3f}"
        cols = f"{'method':10s} {'ratio':>7s} {'rel.err':>8s} {'PR':>8s} {'seconds':>8s}  note"
        rows = [f"{r.method:10s} {r.ratio:7.4f} {r.rel_error:8.4f} {r.retention:8.3f} {r.compress_s:8.2f}  {r.note}" for r in self.rows]
        return "\n".join([head, cols, *rows, "", *self.notes(), "", *self.comparison()])


def _tokenizer(texts: list[str], vocab: int = 512):
    """A byte-level BPE tokenizer trained on the demo texts (tokenizers, in a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _train(model, ids: torch.Tensor, steps: int, lr: float, seed: int, bar, seq: int = 128, batch: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        bar.update(1)
    model.eval()


def build_pair(work: Path, base_steps: int = 120, finetune_steps: int = 60, progress: bool = True) -> tuple[Path, Path]:
    """Write ``work/base`` and ``work/finetuned`` (bf16 safetensors with the tokenizer)."""
    import transformers

    base_text = (DATA / "austen_base_excerpt.txt").read_text()
    ft_text = (DATA / "austen_finetune_excerpt.txt").read_text()
    tok = _tokenizer([base_text, ft_text])
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with progress_bar(total=base_steps + finetune_steps, desc="Training the demo pair", enabled=progress) as bar:
        _train(model, tok(base_text, return_tensors="pt").input_ids[0], base_steps, 3e-3, 1, bar)
        model.to(torch.bfloat16).save_pretrained(work / "base")
        tok.save_pretrained(work / "base")
        model.float()
        _train(model, tok(ft_text, return_tensors="pt").input_ids[0], finetune_steps, 1e-3, 2, bar)
    model.to(torch.bfloat16).save_pretrained(work / "finetuned")
    tok.save_pretrained(work / "finetuned")
    return work / "base", work / "finetuned"


def run_demo(
    ratio: float = 1 / 8,
    *,
    work_dir: str | os.PathLike | None = None,
    base_steps: int = 120,
    finetune_steps: int = 60,
    eval_tokens: int = 2048,
    methods: list[str] | None = None,
    progress: bool = True,
) -> DemoResult:
    """Build the pair, compress with every method, score each, load the default delta and generate.

    >>> r = run_demo(base_steps=4, finetune_steps=2, eval_tokens=64, methods=["dqrelo", "bitdelta"], progress=False)
    >>> [row.method for row in r.rows], r.sample != "", 0 < r.p_base < 1
    (['dqrelo', 'bitdelta'], True, True)
    """
    with quiet_third_party():  # transformers' "Loading weights" bars for every model load: deltahub's bars only
        return _demo(ratio, work_dir, base_steps, finetune_steps, eval_tokens, methods, progress)


def _demo(ratio, work_dir, base_steps, finetune_steps, eval_tokens, methods, progress) -> DemoResult:
    import transformers

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="deltahub-demo-"))
    base, ft = build_pair(work, base_steps, finetune_steps, progress)
    tok = transformers.AutoTokenizer.from_pretrained(ft)
    ids = tok(default_text(), return_tensors="pt").input_ids[0][: eval_tokens + 1]
    nll = {}
    for label, path in (("base", base), ("finetuned", ft)):
        nll[label] = mean_nll(transformers.AutoModelForCausalLM.from_pretrained(path), ids, 256)
    gain = nll["base"] - nll["finetuned"]
    rows = []
    for method in progress_bar(methods or list_methods(), desc="Compressing with every method", enabled=progress):
        r = None if method in NATURAL_SIZE else ratio
        out = work / f"delta-{method}"
        t0 = time.perf_counter()
        try:
            result = compress(base, ft, out, method=method, ratio=r, progress=False, overwrite=True)
        except InfeasibleRatioError as e:
            rows.append(DemoRow(method, math.nan, math.nan, math.nan, 0.0, str(e)))
            continue
        seconds = time.perf_counter() - t0
        model = DeltaModel.from_pretrained(out)
        pr = (nll["base"] - mean_nll(model, ids, 256)) / gain if gain else math.nan
        del model
        gc.collect()
        total_err = _total_error(result)
        note = "natural size" if r is None else (f"{len(result.fallbacks)} small tensors dense" if result.fallbacks else "")
        rows.append(DemoRow(method, result.ratio, total_err, pr, seconds, note))
    default = "auto" if (work / "delta-auto").exists() else next((r.method for r in rows if r.ratio == r.ratio), None)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(base)
    delta_model = DeltaModel.from_pretrained(work / f"delta-{default}") if default else base_model
    said = {label: continue_greedily(m, tok) for label, m in (("base", base_model), ("delta", delta_model))}
    p = {label: continuation_probability(m, tok) for label, m in (("base", base_model), ("delta", delta_model))}
    return DemoResult(rows, nll["base"], nll["finetuned"], PROMPT + said["delta"], work, default or "none",
                      sample_base=said["base"], sample_delta=said["delta"], p_base=p["base"], p_delta=p["delta"])


@torch.no_grad()
def continue_greedily(model, tok, prompt: str = PROMPT, tokens: int = SAMPLE_TOKENS) -> str:
    """The model's greedy continuation of ``prompt`` (deterministic: no sampling; the logits of
    tokens already seen are damped by ``REPETITION_PENALTY``), on one line."""
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, repetition_penalty=REPETITION_PENALTY, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    return " ".join(text.split()) if not text[:1].isspace() else " " + " ".join(text.split())


@torch.no_grad()
def continuation_probability(model, tok, prompt: str = PROMPT, continuation: str = CONTINUATION) -> float:
    """P(continuation | prompt): the product of the model's next-token probabilities over the
    continuation's tokens (tokenized after the prompt, as the model would read them)."""
    n = tok(prompt, return_tensors="pt").input_ids.shape[1]
    ids = tok(prompt + continuation, return_tensors="pt").input_ids
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(torch.exp(logp[n - 1 :].gather(1, targets[n - 1 :, None]).sum()))


def _total_error(result) -> float:
    """sqrt(sum err^2) / sqrt(sum delta^2) needs the delta norms; weight each tensor's error by its size instead."""
    errs = [(t.rel_error, t.dense_bytes) for t in result.tensors if t.kind in ("dense", "compressed") and math.isfinite(t.rel_error)]
    weight = sum(w for _, w in errs)
    return sum(e * w for e, w in errs) / weight if weight else 0.0
