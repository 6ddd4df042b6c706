"""The model pairs the benchmarks run on: the real SmolLM2/Austen pair and generated ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("DELTAHUB_CACHE", Path.home() / ".cache" / "deltahub"))


def add_pair_arguments(ap, default: str = "smollm2-light") -> None:
    """``--model`` (a pair for :func:`get_pair`) and, for ``generated``, ``--hidden`` and ``--layers``."""
    ap.add_argument("--model", default=default, help="smollm2-light, smollm2-heavy, generated or a recorded pair's name")
    ap.add_argument("--hidden", type=int, default=2048, help="generated pair: hidden size")
    ap.add_argument("--layers", type=int, default=24, help="generated pair: layers")


def get_pair(model: str, hidden: int = 2048, layers: int = 24) -> tuple[Path, Path, str]:
    """``(base, finetuned, label)`` for ``smollm2-light``, ``smollm2-heavy``, ``generated`` or a recorded pair's name."""
    if model.startswith("smollm2"):
        from .real_pair import base_path, finetuned_path

        recipe = model.split("-", 1)[1] if "-" in model else "light"
        return base_path(), finetuned_path(recipe), f"SmolLM2-135M + Austen ({recipe})"
    if model == "generated":
        from .generated import build

        base, ft = build(hidden, layers)
        gb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
        return base, ft, f"generated Llama h{hidden} l{layers} ({gb:.1f} GB)"
    from .real_pair import named_pair

    found = named_pair(model)  # a pair recorded by `python -m benchmarks.real_pair --base ... --finetuned ...`
    if found is not None:
        return found
    raise SystemExit(f"unknown model {model!r}: use smollm2-light, smollm2-heavy, generated, or a pair recorded "
                     "with `python -m benchmarks.real_pair --base HUB_ID_OR_PATH --finetuned HUB_ID_OR_PATH --name NAME`")


def prepare(model: str, hidden: int, layers: int, method: str = "dqrelo", ratio: float = 1 / 8) -> tuple[Path, Path, Path, Path, str]:
    """``(base, finetuned, delta, applied, label)``: the pair, its delta (compressed once, then
    cached) and where the applied checkpoint goes."""
    import deltahub

    base, ft, label = get_pair(model, hidden, layers)
    work = CACHE / "bench" / f"{model}-h{hidden}-l{layers}-{method}"
    delta, applied = work / "delta", work / "applied"
    if not (delta / "delta_config.json").is_file():
        shutil.rmtree(delta, ignore_errors=True)
        deltahub.compress(base, ft, delta, method=method, ratio=ratio)
    return base, ft, delta, applied, label
