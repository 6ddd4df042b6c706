"""``deltahub.apply``: write the full fine-tuned checkpoint (base + delta) for any loader."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from .progress import progress as progress_bar

from .checkpoint import TOKENIZER_FILES, Checkpoint
from .format import FINETUNED_CONFIG_NAME
from .format.dtypes import to_torch
from .format.repo import atomic_dir, check_out_dir, parse_size
from .format.safetensors_stream import SafetensorsStreamWriter
from .sources import HubOptions, decode_checked, open_pair, read_finetuned_config, repo_file


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
    out = check_out_dir(out_dir, overwrite, inputs=(delta, base))  # refused before anything is downloaded
    reader, base_ckpt = open_pair(delta, base, revision=revision, base_revision=base_revision, hub=HubOptions(token, cache_dir, local_files_only), verify_base=verify_base)
    read_finetuned_config(reader)  # bounded and checked before it is copied as config.json
    copies = _config_files(reader.path, base_ckpt)  # links out of either repo refused before any work
    limit = parse_size(max_shard_size)
    layouts = _plan_shards([(n, to_torch(r["dtype"]), tuple(r["shape"])) for n, r in reader.records.items() if r["kind"] != "removed"], limit)
    def decode(name: str) -> torch.Tensor:
        return decode_checked(reader, base_ckpt, name)  # NaN/Inf where the base is finite: refused

    names = [name for layout in layouts for name, _, _ in layout]
    from .chain import chain_inputs

    inputs = (delta, base, reader.path, base_ckpt.path, *chain_inputs(base_ckpt))  # a chain: every parent and the keyframe's base
    with atomic_dir(out, overwrite, inputs=inputs) as tmp, progress_bar(total=len(names), desc="Applying", enabled=progress) as bar:
        decoded = decoded_ahead(decode, names)
        shards: list[tuple[Path, list[str]]] = []
        try:
            for i, layout in enumerate(layouts):
                # Every output tensor's name, dtype and shape is known from the records, so each shard's
                # header is written first and the tensors straight after it (no spool file to copy).
                writer = SafetensorsStreamWriter(tmp / f"part-{i:05d}.tmp", metadata={"format": "pt"}, layout=layout, checksum=False)
                shards.append((writer.path, [name for name, _, _ in layout]))
                try:
                    for name, _, _ in layout:
                        writer.add(name, next(decoded))
                        bar.update()
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
        finally:
            decoded.close()
        _finish_shards(tmp, shards)
        for name, src in copies.items():
            shutil.copyfile(src, tmp / name)
    return out


def decoded_ahead(decode: Callable[[str], torch.Tensor], names: list[str], workers: int | None = None) -> Iterator[torch.Tensor]:
    """``decode(name)`` for each name, in order, computed ahead by ``workers`` threads.

    Writing a checkpoint is bound by the disk (or the page cache) and decoding by the cores:
    with the next tensors decoded while one is written, the two overlap. At most
    ``workers + 1`` decoded tensors wait at a time, so memory stays a few tensors. Each worker
    runs torch on its share of the caller's cores. Closing the generator drops what was not
    yet taken.
    """
    threads = torch.get_num_threads()
    workers = workers or max(1, min(2, threads))
    share = max(1, threads // workers)
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(share,))
    pending: deque[Future] = deque()
    try:
        for name in names:
            pending.append(pool.submit(decode, name))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)  # a worker's set_num_threads also set the default threads adopt


def _plan_shards(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], limit: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Tensors in order, cut into shards of at most ``limit`` bytes (a larger tensor alone)."""
    layouts: list[list] = []
    size = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * dtype.itemsize
        if not layouts or (size and size + n > limit):
            layouts.append([])
            size = 0
        layouts[-1].append((name, dtype, shape))
        size += n
    return layouts


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


def _delta_file(delta_dir: Path, name: str) -> Path | None:
    """``delta_dir/name`` if the delta repo has it (else ``None``); a link out of it is refused
    (``limits.confined_file``), so nothing outside the repo is ever copied into the output, and
    so is an entry that is not a regular file (a FIFO would block the copy, and skipping it
    would put the base's file in the delta's place): ``sources.repo_file``."""
    return repo_file(delta_dir, name, "the delta repo")


def _config_files(delta_dir: Path, base: Checkpoint) -> dict[str, Path]:
    """Output name -> source of the files written beside the weights: the fine-tune's config,
    and the generation and tokenizer files, each from the delta repo when there, else from the
    base; files of either are confined to their folder."""
    out = {}
    cfg = _delta_file(delta_dir, FINETUNED_CONFIG_NAME)
    if cfg is not None:
        out["config.json"] = cfg
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        src = _delta_file(delta_dir, name) or base.file(name)
        if src is not None:
            out[name] = src
    return out
