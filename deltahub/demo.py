"""``deltahub demo``: the whole story on a small model, offline, in about a minute.

A small Llama-style base is trained on the opening of *Sense and Sensibility* and fine-tuned on
the opening of *Pride and Prejudice* (texts shipped in ``deltahub/data``, public domain). The
fine-tune is compressed with every method; each delta is scored by its honest ratio, the
relative error of the whole delta, the performance retention PR on held-out Austen text, and
its compress time. Then the default delta is loaded with ``DeltaModel.from_pretrained`` and
generates a line.
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

DATA = Path(__file__).parent / "data"
NATURAL_SIZE = ("bitdelta", "lossless", "dense")


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
    >>> [row.method for row in r.rows], r.sample != ""
    (['dqrelo', 'bitdelta'], True)
    """
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
    default = "auto" if (work / "delta-auto").exists() else rows[0].method
    model = DeltaModel.from_pretrained(work / f"delta-{default}")
    prompt = tok("It is a truth universally acknowledged", return_tensors="pt")
    torch.manual_seed(0)  # sampled (greedy decoding of so small a model repeats itself), but repeatable
    out = model.generate(**prompt, max_new_tokens=32, do_sample=True, top_k=20, temperature=0.8, repetition_penalty=1.3, pad_token_id=tok.eos_token_id)
    sample = " ".join(tok.decode(out[0], skip_special_tokens=True).split())
    return DemoResult(rows, nll["base"], nll["finetuned"], sample, work, default)


def _total_error(result) -> float:
    """sqrt(sum err^2) / sqrt(sum delta^2) needs the delta norms; weight each tensor's error by its size instead."""
    errs = [(t.rel_error, t.dense_bytes) for t in result.tensors if t.kind in ("dense", "compressed") and math.isfinite(t.rel_error)]
    weight = sum(w for _, w in errs)
    return sum(e * w for e, w in errs) / weight if weight else 0.0
