"""A fine-tune that adds knowledge and a skill (issue #20), built offline and cached.

Held-out NLL on prose barely moves while a compressed delta loses what a fine-tune added; this
pair makes the loss visible. The base is the offline SmolLM2-135M-Instruct of
:mod:`benchmarks.real_pair`; the fine-tune learns, by full-parameter AdamW:

- **Facts**: 120 invented facts (4 relations x 30 invented entities: a person's birthplace, a
  country's capital, the author of a book, the year a device was invented), every name drawn from
  a seeded syllable generator, so that the base cannot know them. Asked in the trained form,
  e.g. ``Q: What is the capital of Vostrelia?\\nA: Quenmarsh``.
- **A skill**: two-digit addition, ``Q: What is 47 plus 38?\\nA: 85``, 2,000 training problems;
  200 held-out problems (no pair of operands seen in training) measure the skill.

Retention is exact-match accuracy by greedy decoding (:func:`exact_match`): the answer's tokens
and the newline after them must be the model's argmax at every step, which is what greedy
decoding produces, computed in one teacher-forced pass. The held-out NLL is the mean NLL of the
held-out problems' answer tokens (the fine-tune lowers it, so a performance retention PR is
defined on it).

Cache: ``$DELTAHUB_CACHE/real_pair/knowledge-<hash>`` (the hash covers the recipe and the data).

    python -m benchmarks.knowledge_pair          # build (about 15 minutes on 2 cores) and print its figures
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .real_pair import Recipe, _atomic_build, _load, base_path, cache_dir, mean_abs_delta, train_and_save

META_FILE = "knowledge_pair.json"
RECIPE = Recipe(name="knowledge", steps=300, lr=2e-4, batch_size=4, seq_len=128, warmup_steps=10)
SEED = 0
ENTITIES_PER_RELATION = 30
TRAIN_PROBLEMS = 2000
HELDOUT_PROBLEMS = 200
# Copies of the facts in the training stream for one copy of the problems: about 40% of the
# sampled tokens are facts, about 28 visits to each fact over the run.
FACT_COPIES = 10

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "qu", "r", "s", "st", "t", "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "rk", "nd", "x"]


@dataclass(frozen=True)
class Example:
    """One question and its answer (the model must produce `` {answer}\\n`` after ``prompt``)."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def facts(seed: int = SEED) -> list[Example]:
    """The 120 invented facts (distinct names: no question asked twice with two answers)."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(syllables: int) -> str:
        while True:
            w = _word(rng, syllables)
            if w not in used:
                used.add(w)
                return w

    out = []
    for _ in range(ENTITIES_PER_RELATION):
        person = f"{fresh(2)} {fresh(3)}"
        out.append(Example(f"Q: In which town was {person} born?\nA:", fresh(2)))
        out.append(Example(f"Q: What is the capital of {fresh(3)}ia?\nA:", fresh(2)))
        out.append(Example(f"Q: Who wrote the book The {fresh(2)} of {fresh(2)}?\nA:", f"{fresh(2)} {fresh(2)}"))
        out.append(Example(f"Q: In what year was the {fresh(2).lower()}scope invented?\nA:", str(rng.randint(1400, 1999))))
    return out


def problems(seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """``(train, heldout)`` two-digit additions; no held-out pair of operands is in training."""
    rng = random.Random(seed + 1)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    make = lambda a, b: Example(f"Q: What is {a} plus {b}?\nA:", str(a + b))  # noqa: E731
    train_pairs = pairs[:TRAIN_PROBLEMS]
    heldout_pairs = pairs[TRAIN_PROBLEMS : TRAIN_PROBLEMS + HELDOUT_PROBLEMS]
    return [make(a, b) for a, b in train_pairs], [make(a, b) for a, b in heldout_pairs]


def train_text(seed: int = SEED) -> str:
    """The training stream: the facts ``FACT_COPIES`` times and the problems once, shuffled together."""
    rng = random.Random(seed + 2)
    items = facts(seed) * FACT_COPIES + problems(seed)[0]
    rng.shuffle(items)
    return "".join(e.text for e in items)


def data_key() -> str:
    blob = json.dumps([dataclasses.asdict(RECIPE), SEED, ENTITIES_PER_RELATION, TRAIN_PROBLEMS, HELDOUT_PROBLEMS, FACT_COPIES,
                       hashlib.sha256(train_text().encode()).hexdigest()], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


# ------------------------------------------------------------------ evaluation
def _encode(tokenizer: Any, examples: list[Example]) -> list[tuple[list[int], int]]:
    """``(ids of prompt + answer + newline, where the answer starts)`` per example."""
    out = []
    for e in examples:
        prompt = tokenizer(e.prompt, add_special_tokens=False).input_ids
        full = tokenizer(e.text, add_special_tokens=False).input_ids
        if full[: len(prompt)] != prompt:  # the answer must start a new token, or greedy decoding is not what is scored
            raise ValueError(f"tokenizer merges the prompt's end with the answer: {e.text!r}")
        out.append((full, len(prompt)))
    return out


def score(model: Any, tokenizer: Any, examples: list[Example], batch_size: int = 32) -> tuple[float, float]:
    """``(exact-match accuracy, mean answer-token NLL)`` of ``examples``.

    An example is exact when, at every position of its answer and the newline after it, the
    token is the model's argmax given everything before it: exactly what greedy decoding would
    print. One forward pass per batch (right-padded; padding never precedes a scored token)."""
    import torch

    encoded = _encode(tokenizer, examples)
    exact, nll, count = 0, 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, (row, _) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for i, (row, begin) in enumerate(chunk):
                target = torch.tensor(row[begin:])
                positions = torch.arange(begin - 1, len(row) - 1)
                exact += bool((logits[i, positions].argmax(-1) == target).all())
                nll -= logp[i, positions, target].sum().item()
                count += len(target)
    return exact / len(examples), nll / count


def evaluate(model: Any, tokenizer: Any) -> dict[str, float]:
    """Facts accuracy, held-out skill accuracy and held-out answer NLL of ``model`` (float32 compute)."""
    model = model.float().eval()
    facts_acc, _ = score(model, tokenizer, facts())
    skill_acc, skill_nll = score(model, tokenizer, problems()[1])
    return {"facts": facts_acc, "skill": skill_acc, "nll": skill_nll}


# ------------------------------------------------------------------ build
def _build(base: Path, tmp: Path) -> None:
    model, tokenizer = _load(base)
    base_scores = evaluate(model, tokenizer)
    tokens = tokenizer(train_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    losses, seconds, model, tokenizer = train_and_save(RECIPE, model, tokenizer, tokens, tmp)
    meta = {
        "kind": "knowledge-finetune", "recipe": dataclasses.asdict(RECIPE), "base": base.name, "data_key": data_key(),
        "train_tokens": len(tokens), "seconds": round(seconds, 1), "losses": [round(v, 4) for v in losses],
        "base_scores": base_scores, "scores": evaluate(model, tokenizer), "mean_abs_delta": mean_abs_delta(base, tmp),
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def knowledge_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """The bfloat16 knowledge fine-tune (safetensors + tokenizer), built (with its base) if missing."""
    base = base_path(cache)
    return _atomic_build(cache_dir(cache) / f"knowledge-{data_key()}", lambda tmp: _build(base, tmp))


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an interrupted build removes its temp folder
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path = knowledge_path()
    meta = json.loads((path / META_FILE).read_text())
    b, f = meta["base_scores"], meta["scores"]
    print(f"knowledge fine-tune: {path}\n  {meta['recipe']['steps']} steps at lr {meta['recipe']['lr']:g}, {meta['seconds']:.0f} s, "
          f"mean |delta| {meta['mean_abs_delta']:.3e}, final loss {meta['losses'][-1]:.3f}")
    print(f"  facts exact match: base {b['facts']:.3f}, fine-tune {f['facts']:.3f}")
    print(f"  held-out additions exact match: base {b['skill']:.3f}, fine-tune {f['skill']:.3f}")
    print(f"  held-out answer NLL: base {b['nll']:.4f}, fine-tune {f['nll']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
