"""``deltahub.apply``: write the full fine-tuned checkpoint (base + delta) for any loader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import TOKENIZER_FILES
from .format import FINETUNED_CONFIG_NAME
from .format.repo import atomic_dir, check_out_dir, parse_size
from .format.safetensors_stream import SafetensorsStreamWriter
from .sources import HubOptions, open_pair


def apply(
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    verify_base: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Rebuild the fine-tune and save it as a transformers checkpoint, one tensor at a time.

    Writes ``model.safetensors`` (or shards with ``model.safetensors.index.json``),
    ``config.json``, ``generation_config.json`` and tokenizer files (the delta's, else the
    base's). The result loads with ``AutoModel.from_pretrained`` or vLLM.

    Example::

        deltahub.apply("user/my-delta", "full-model")
    """
    out = check_out_dir(out_dir, overwrite)  # refused before anything is downloaded
    reader, base_ckpt = open_pair(delta, base, revision=revision, base_revision=base_revision, hub=HubOptions(token, cache_dir, local_files_only), verify_base=verify_base)
    limit = parse_size(max_shard_size)
    with atomic_dir(out, overwrite) as tmp:
        shards: list[tuple[Path, list[str]]] = []
        writer: SafetensorsStreamWriter | None = None
        total = sum(1 for r in reader.records.values() if r["kind"] != "removed")
        for name in tqdm([n for n, r in reader.records.items() if r["kind"] != "removed"], total=total, desc="Applying", disable=not progress):
            t = reader.decode(name, base_ckpt.get(name) if name in base_ckpt else None, consume_base=True)
            size = t.numel() * t.element_size()
            if writer is not None and writer.nbytes and writer.nbytes + size > limit:
                writer.close()
                writer = None
            if writer is None:
                writer = SafetensorsStreamWriter(tmp / f"part-{len(shards):05d}.tmp", metadata={"format": "pt"})
                shards.append((writer.path, []))
            writer.add(name, t)
            shards[-1][1].append(name)
            del t
        if writer is not None:
            writer.close()
        _finish_shards(tmp, shards)
        _copy_configs(reader.path, base_ckpt.path, tmp)
    return out


def _finish_shards(tmp: Path, shards: list[tuple[Path, list[str]]]) -> None:
    if len(shards) == 1:
        os.replace(shards[0][0], tmp / "model.safetensors")
        return
    weight_map = {}
    total_size = 0
    for i, (path, names) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, tmp / final)
        total_size += (tmp / final).stat().st_size
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_configs(delta_dir: Path, base_dir: Path, tmp: Path) -> None:
    cfg = delta_dir / FINETUNED_CONFIG_NAME
    if cfg.is_file():
        shutil.copyfile(cfg, tmp / "config.json")
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        for src in (delta_dir / name, base_dir / name):
            if src.is_file():
                shutil.copyfile(src, tmp / name)
                break
