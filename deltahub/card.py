"""The model card (``README.md``) of a delta repo, rendered from ``delta_config.json``."""

from __future__ import annotations

from typing import Mapping

from huggingface_hub import ModelCardData


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_card(config: Mapping, repo_id: str | None = None) -> str:
    """Markdown with Hub metadata: ``base_model``, ``base_model_relation: adapter``, ``library_name: deltahub``."""
    base = config.get("base", {})
    method = config.get("method", {})
    totals = config.get("totals", {})
    summary = config.get("summary", {})
    base_id = base.get("name_or_path") or "BASE"
    data = ModelCardData(
        base_model=base_id if base.get("revision") else None,
        library_name="deltahub",
        tags=["deltahub", "delta-compression", f"deltahub-{method.get('name', 'unknown')}"],
    )
    meta = data.to_dict()
    if base.get("revision"):
        meta["base_model_relation"] = "adapter"
    front = ModelCardData(**meta).to_yaml()
    name = repo_id or "PATH/TO/DELTA"
    ratio = totals.get("ratio")
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {repo_id or 'deltahub delta'}",
        "",
        f"A fine-tune stored as a compressed delta against [`{base_id}`]" + (f"(https://huggingface.co/{base_id})" if base.get("revision") else "") + " with deltahub (`pip install deltahub`).",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{base_id}`" + (f" at `{base['revision']}`" if base.get("revision") else "") + " |",
        f"| method | `{method.get('name')}` at ratio {method.get('ratio')} |",
    ]
    if ratio is not None:
        lines.append(f"| stored | {human_bytes(totals['stored_bytes'])} for a {human_bytes(totals['dense_bytes'])} dense delta: ratio {ratio:.4f} ({1 / ratio:.1f}x smaller) |")
    if summary.get("mean_rel_error") is not None:
        lines.append(f"| relative error of the delta | mean {summary['mean_rel_error']:.4f}, worst {summary['max_rel_error']:.4f} |")
    lines.append(f"| format | deltahub {config.get('format_version')}, written by deltahub {config.get('deltahub_version')} |")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from deltahub import DeltaModel",
        "",
        f'model = DeltaModel.from_pretrained("{name}", device_map="auto")  # fetches the base recorded in delta_config.json',
        "```",
        "",
        "Or write the full checkpoint once, for transformers or vLLM:",
        "",
        "```bash",
        f"deltahub apply {name} -o full-model",
        "```",
        "",
    ]
    worst = summary.get("worst") or []
    if worst:
        lines += ["## Tensors with the largest error", "", "| tensor | relative error |", "|---|---|"]
        lines += [f"| `{n}` | {e:.4f} |" for n, e in worst]
        lines.append("")
    return "\n".join(lines)
