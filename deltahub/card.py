"""The model card (``README.md``) of a delta repo, rendered from ``delta_config.json``.

The config (and, for the versions table, commit messages and tags) may come from anyone who can
push to the repo, so every value is escaped before it is written into markdown: :func:`md_text`
for table cells and prose, :func:`md_code` for names shown as code. YAML front matter is written
by ``ModelCardData``, and only a valid Hub repo id becomes ``base_model``.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from huggingface_hub import ModelCardData

# A Hub repo id ("org/name" or "name"): what base_model and a huggingface.co link may hold.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# A name shown as inline code as is (tensor names, methods, paths, revisions): no backtick, no
# space, nothing a table or HTML would read.
_CODE_SAFE = re.compile(r"^[A-Za-z0-9_./@:+=-]{1,300}$")
# Line breaks and other control characters (a newline would end a table row).
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
MAX_CELL_CHARS = 300


def md_text(value: object, limit: int = MAX_CELL_CHARS) -> str:
    r"""``value`` as plain text inside a markdown table cell or line: line breaks become spaces,
    ``\ | * _ ` ~ [ ]`` are backslash-escaped, ``< > &`` become entities (no HTML, no links, no
    emphasis), and it is cut to ``limit`` characters.

    >>> md_text("ok |\n| v9 | forged <b>row</b>")
    'ok \\| \\| v9 \\| forged &lt;b&gt;row&lt;/b&gt;'
    """
    text = _BREAKS.sub(" ", str(value)).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\|*_`~\[\]])", r"\\\1", text)


def md_code(value: object) -> str:
    """``value`` as inline code when it is a plain name, else as escaped text (a backtick or a
    pipe inside a code span would end it or split the table)."""
    text = str(value)
    return f"`{text}`" if _CODE_SAFE.match(text) else md_text(text)


def _number(value: object) -> float | None:
    """A finite number from the config, or None (a string or null there must not crash a card)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mapping(value: object) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_card(config: Mapping, repo_id: str | None = None) -> str:
    """Markdown with Hub metadata: ``base_model`` and ``base_model_relation: adapter`` whenever
    the base is a Hub repo id, ``library_name: deltahub``.

    Every value from ``config`` is escaped (:func:`md_text`, :func:`md_code`), and a field of the
    wrong type is left out rather than failing: the config may come from an untrusted repo."""
    base, method = _mapping(config.get("base")), _mapping(config.get("method"))
    totals, summary = _mapping(config.get("totals")), _mapping(config.get("summary"))
    name_or_path, revision = base.get("name_or_path"), base.get("revision")
    base_id = name_or_path if isinstance(name_or_path, str) and name_or_path else "BASE"
    revision = revision if isinstance(revision, str) and revision else None
    # A Hub repo id is a Hub base (a local base is recorded as an absolute path): it becomes
    # base_model and a link, pinned or not (push refuses an unpinned one unless told otherwise).
    on_hub = base_id != "BASE" and bool(_REPO_ID.match(base_id))
    unchecked = base.get("id_checked") is False  # a Hub id recorded for a local base, offline
    method_name = method.get("name") if isinstance(method.get("name"), str) and _CODE_SAFE.match(method.get("name")) else "unknown"
    data = ModelCardData(
        base_model=base_id if on_hub else None,
        library_name="deltahub",
        tags=["deltahub", "delta-compression", f"deltahub-{method_name}"],
    )
    meta = data.to_dict()
    if on_hub:
        meta["base_model_relation"] = "adapter"
    front = ModelCardData(**meta).to_yaml()
    name = repo_id or "PATH/TO/DELTA"
    ratio, stored, dense = (_number(totals.get(k)) for k in ("ratio", "stored_bytes", "dense_bytes"))
    method_ratio = _number(method.get("ratio"))
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {md_text(repo_id or 'deltahub delta')}",
        "",
        "A fine-tune stored as a compressed delta against "
        + (f"[`{base_id}`](https://huggingface.co/{base_id})" if on_hub else md_code(base_id))
        + " with deltahub (`pip install deltahub`).",
        "",
        "| | |",
        "|---|---|",
        f"| base | {md_code(base_id)}" + (f" at {md_code(revision)}" if revision else "")
        + (" (recorded for a local copy, not checked against the Hub)" if unchecked else "") + " |",
        f"| method | {md_code(method_name)}" + (f" at ratio {method_ratio:g}" if method_ratio is not None else "") + " |",
    ]
    parent = _mapping(config.get("parent"))
    if parent:
        at = f" at {md_code(parent.get('revision'))}" if isinstance(parent.get("revision"), str) else ""
        depth = parent.get("depth") if isinstance(parent.get("depth"), int) else "?"
        lines.append(f"| stored against | the parent version {md_code(parent.get('name_or_path'))}{at}, bit-exact ({md_text(depth, 4)} version(s) down to its keyframe) |")
    if ratio and stored is not None and dense is not None:
        lines.append(f"| stored | {human_bytes(stored)} for a {human_bytes(dense)} dense delta: ratio {ratio:.4f} ({1 / ratio:.1f}x smaller) |")
    mean, worst_error = _number(summary.get("mean_rel_error")), _number(summary.get("max_rel_error"))
    if mean is not None and worst_error is not None:
        lines.append(f"| relative error of the delta | mean {mean:.4f}, worst {worst_error:.4f} |")
    lines.append(f"| format | deltahub {md_text(config.get('format_version'), 20)}, written by deltahub {md_text(config.get('deltahub_version'), 40)} |")
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
    worst = summary.get("worst")
    rows = [(n, e) for n, e in (w for w in worst if isinstance(w, (list, tuple)) and len(w) == 2) if _number(e) is not None] if isinstance(worst, list) else []
    if rows:
        lines += ["## Tensors with the largest error", "", "| tensor | relative error |", "|---|---|"]
        lines += [f"| {md_code(n)} | {_number(e):.4f} |" for n, e in rows[:50]]
        lines.append("")
    return "\n".join(lines)
