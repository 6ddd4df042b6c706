"""``deltahub.compress``: stream two checkpoints tensor by tensor into a delta repo."""

from __future__ import annotations

import filecmp
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from .progress import progress as progress_bar

from .calibration import Calibration, CalibrationError, read_text
from .card import human_bytes, render_card
from .checkpoint import TOKENIZER_FILES, Checkpoint, CheckpointError, borrow_base, sample_digest
from .encoding import EncodedTensor, encode_tensor
from .errors import InfeasibleRatioError, ShapeMismatchError
from .format import FINETUNED_CONFIG_NAME, DeltaWriter, make_record
from .format.repo import check_out_dir
from .memory import memory_source
from .format.dtypes import itemsize, to_torch
from .methods import Planned, get_method
from .methods.linalg import compute_device
from .planning import plan_ratios
from .policy import Policy, Rule
from .version import __version__

EXTRA_FILES = ("generation_config.json",)


@dataclass
class TensorReport:
    """One tensor's outcome: kind, method, sizes and the relative error of its delta."""

    name: str
    kind: str
    method: str | None
    shape: tuple[int, ...]
    dense_bytes: int
    stored_bytes: int
    rel_error: float


@dataclass
class CompressResult:
    """What ``compress`` wrote, with the figures of its summary."""

    path: Path
    tensors: list[TensorReport] = field(default_factory=list)
    dense_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def errors(self) -> list[float]:
        return [t.rel_error for t in self.tensors if t.kind in ("dense", "compressed")]

    @property
    def mean_rel_error(self) -> float:
        e = self.errors()
        return sum(e) / len(e) if e else 0.0

    @property
    def max_rel_error(self) -> float:
        return max(self.errors(), default=0.0)

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        ranked = sorted((t for t in self.tensors if t.kind in ("dense", "compressed")), key=lambda t: -t.rel_error)
        return [(t.name, round(t.rel_error, 6)) for t in ranked[:n]]

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for t in self.tensors:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        return (
            f"{self.path}: {len(self.tensors)} tensors ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}); "
            f"{human_bytes(self.dense_bytes)} dense delta -> {human_bytes(self.stored_bytes)} stored, ratio {self.ratio:.4f} "
            f"({1 / self.ratio if self.ratio else float('inf'):.1f}x); relative error mean {self.mean_rel_error:.4f}, worst {self.max_rel_error:.4f}; "
            f"{self.seconds:.1f} s"
        )


def relative_error(base: torch.Tensor | None, finetuned: torch.Tensor, decoded: torch.Tensor) -> float:
    """||decoded - ft|| / ||ft - base|| in float32 (0 when the delta is zero and reproduced)."""
    b = base.to(torch.float32) if base is not None and base.shape == finetuned.shape else None
    true = finetuned.to(torch.float32) - (b if b is not None else 0.0)
    err = float((decoded.to(torch.float32) - finetuned.to(torch.float32)).norm())
    denom = float(true.norm())
    return err / denom if denom else (0.0 if err == 0 else math.inf)


def _check_architectures(base: Checkpoint, ft: Checkpoint) -> None:
    bc, fc = base.config(), ft.config()
    if not bc or not fc:
        return
    for key in ("model_type", "architectures"):
        if bc.get(key) and fc.get(key) and bc.get(key) != fc.get(key):
            raise ShapeMismatchError(
                f"architecture mismatch: the base is {key}={bc.get(key)!r}, the fine-tune {key}={fc.get(key)!r}; "
                "a delta is only meaningful against the model the fine-tune started from"
            )


def compress(
    base: str | os.PathLike,
    finetuned: str | os.PathLike | torch.nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    method: str = "auto",
    ratio: float | None = 1 / 8,
    *,
    params: Mapping[str, Any] | None = None,
    rules: Iterable[Rule | str] = (),
    seed: int = 0,
    device: str = "cpu",
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fallback_dense: bool = True,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = 2048,
    progress: bool = True,
) -> CompressResult:
    """Compress ``finetuned - base`` into a delta repo at ``out_dir``, one tensor at a time.

    ``base`` and ``finetuned`` are local folders or Hub repo ids. Tensors of one dimension are
    stored dense; ``rules`` (``"PATTERN=METHOD[:k=v,...]"``) override the method by name. A
    tensor too small for the ratio falls back to ``dense`` (listed in the result) unless
    ``fallback_dense=False``. Nothing appears at ``out_dir`` until the whole repo is written.
    ``calibration``: a text file for ``auto``'s activation-aware mode (the base model runs over
    its first ``calibration_tokens`` tokens once; see :mod:`deltahub.calibration`).

    Example::

        result = deltahub.compress("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "qwen-instruct-delta", ratio=1/8)
        print(result)
    """
    t0 = time.perf_counter()
    ft_memory = memory_source(finetuned)  # an in-memory model or state dict (deltahub.memory)
    if ft_memory is not None:
        if revision is not None:
            raise CheckpointError(f"the fine-tune is {ft_memory.source}, not a Hub repo: drop revision={revision!r}")
        finetuned = None  # nothing on disk to check, refuse or record by name
    # The output may not be, hold or lie inside an input: checked on the names given before any
    # download, and again on the folders they resolve to (Hub ids -> cache snapshots).
    check_out_dir(out_dir, overwrite, inputs=(base, finetuned, calibration))
    params = dict(params or {})
    get_method(method, **params)  # unknown methods and parameters fail before any download
    policy = Policy(method, ratio, params, [r if isinstance(r, Rule) else Rule.parse(r) for r in rules])
    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    base_ckpt = Checkpoint.open(base, revision=base_revision, **hub)
    ft_ckpt = ft_memory if ft_memory is not None else Checkpoint.open(finetuned, revision=revision, **hub)
    inputs = (base, finetuned, calibration, base_ckpt.path, ft_ckpt.path)
    check_out_dir(out_dir, overwrite, inputs=inputs)
    _check_architectures(base_ckpt, ft_ckpt)
    _check_ratios(policy, {to_torch(ft_ckpt.info(n).dtype) for n in ft_ckpt.names()})
    result = CompressResult(Path(out_dir))
    planner = get_method(method, **params)
    cal = None
    if calibration is not None:
        if not planner.plans:
            raise ValueError(f"--calibration is used by the 'auto' method only, not {method!r}; drop it or use --method auto")
        text = read_text(calibration)
        if base_ckpt.path is None or not Path(base_ckpt.path).is_dir():
            raise CalibrationError("calibration needs the base as a local folder or a downloaded Hub snapshot")
        cal = Calibration.collect(base_ckpt.path, text, max_tokens=calibration_tokens)
        cal_record = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": cal.tokens}
    # A planning method (auto) sees every tensor's statistics first and spreads the model's budget.
    planned = plan_ratios(planner, policy, base_ckpt, ft_ckpt, progress, cal) if planner.plans and ratio is not None else {}
    names = ft_ckpt.names()
    removed = [n for n in base_ckpt.names() if n not in ft_ckpt]
    dtypes: dict[str, int] = {}
    total = sum(itemsize(ft_ckpt.info(n).dtype) * math.prod(ft_ckpt.info(n).shape) for n in names)
    samples: dict[str, str] = {}
    with compute_device(device), DeltaWriter(out_dir, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs) as writer:
        bar = progress_bar(total=total, unit="B", unit_scale=True, desc="Compressing", enabled=progress)
        for name in names:
            info = ft_ckpt.info(name)
            if to_torch(info.dtype).is_floating_point:
                dtypes[info.dtype] = dtypes.get(info.dtype, 0) + math.prod(info.shape)
            # Both tensors are views of the files' pages, given back once the tensor is encoded.
            with ft_ckpt.borrow(name) as ft, borrow_base(base_ckpt, name) as b:
                if b is not None:
                    samples[name] = sample_digest(b)
                enc, used = _encode(name, b, ft, policy, seed, fallback_dense, planned.get(name), cal.hessian(name) if cal and name in planned else None)
                if used != policy.resolve(name, tuple(ft.shape))[0]:
                    result.fallbacks.append(name)
                writer.add(name, enc.record, enc.tensors)
                kind = enc.record["kind"]
                report_method = None if kind == "unchanged" else enc.record.get("method", used)
                stored = 0 if kind == "unchanged" else enc.nbytes
                result.tensors.append(TensorReport(name, kind, report_method, tuple(ft.shape), enc.dense_nbytes, stored, relative_error(b, ft, enc.decode(b))))
                bar.update(enc.dense_nbytes)
                bar.set_postfix_str(name[-40:], refresh=False)
                del enc  # before the next tensor is read
        bar.close()
        for name in removed:
            info = base_ckpt.info(name)
            record, _ = make_record("removed", info.shape, info.dtype)
            writer.add(name, record, {})
            result.tensors.append(TensorReport(name, "removed", None, info.shape, 0, 0, 0.0))
        _copy_extra_files(writer, base_ckpt, ft_ckpt)
        result.dense_bytes = sum(t.dense_bytes for t in result.tensors)
        ft_dtype = max(dtypes, key=dtypes.get) if dtypes else None
        config = {
            "deltahub_version": __version__,
            "base": {"name_or_path": _recorded_name(base, base_ckpt), "revision": base_ckpt.revision, "fingerprint": base_ckpt.fingerprint(), "samples": samples},
            "finetuned": {"name_or_path": _recorded_name(finetuned, ft_ckpt), "revision": ft_ckpt.revision, "dtype": str(to_torch(ft_dtype)).removeprefix("torch.") if ft_dtype else None, "fingerprint": ft_ckpt.fingerprint()},
            "method": {"name": method, "ratio": ratio, "params": get_method(method, **params).params(), **({"calibration": cal_record} if cal else {})},
            "rules": [r.to_dict() for r in policy.rules],
            "seed": seed,
            "totals": {"dense_bytes": result.dense_bytes},
            "summary": {
                "mean_rel_error": round(result.mean_rel_error, 6),
                "max_rel_error": round(result.max_rel_error, 6),
                "worst": result.worst(),
                "fallback_dense": result.fallbacks,
            },
        }
        path = writer.finish(config, card=render_card)
    from .format import DeltaReader

    result.stored_bytes = DeltaReader(path).config["totals"]["stored_bytes"]
    result.seconds = time.perf_counter() - t0
    return result


def _recorded_name(given: str | os.PathLike | None, ckpt: Checkpoint) -> str | None:
    """A Hub id as given; a local folder as an absolute path, so the delta loads from anywhere."""
    if given is None:
        return None  # an in-memory fine-tune has no name to record
    return str(given) if ckpt.revision is not None else str(Path(given).expanduser().resolve())


def _check_ratios(policy: Policy, dtypes: set[torch.dtype]) -> None:
    """Fail before any work when a method can never meet its ratio (not per tensor, with fallbacks)."""
    choices = [(policy.method, policy.params, policy._ratio_for(policy.method))]
    choices += [(r.method, {k: v for k, v in r.params.items() if k != "ratio"}, r.params.get("ratio", policy._ratio_for(r.method))) for r in policy.rules]
    for method, params, ratio in choices:
        m = get_method(method, **params)
        for dt in dtypes:
            if dt.is_floating_point:
                m.check_ratio(ratio, dt)


def _encode(name: str, base: torch.Tensor | None, ft: torch.Tensor, policy: Policy, seed: int, fallback_dense: bool, planned: Planned | None = None, hessian: torch.Tensor | None = None) -> tuple[EncodedTensor, str]:
    method, params, ratio = policy.resolve(name, tuple(ft.shape))
    if planned is not None:
        ratio, params = planned.ratio, {**params, **planned.params}
    if not ft.is_floating_point():
        if base is not None and base.dtype == ft.dtype and torch.equal(base, ft):
            from .format.dtypes import to_name

            record, tensors = make_record("unchanged", tuple(ft.shape), to_name(ft.dtype))
            return EncodedTensor(name, record, tensors), method
        raise CheckpointError(f"tensor {name!r} is {ft.dtype} and differs from the base; deltahub stores deltas of floating-point tensors only")
    try:
        return encode_tensor(name, base, ft, method, ratio, seed=seed, hessian=hessian, **params), method
    except InfeasibleRatioError:
        if not fallback_dense or base is None or base.shape != ft.shape:
            raise
        return encode_tensor(name, base, ft, "dense", None, seed=seed), "dense"


def _copy_extra_files(writer: DeltaWriter, base: Checkpoint, ft: Checkpoint) -> None:
    cfg = ft.file("config.json")
    if cfg is not None:
        writer.add_file(FINETUNED_CONFIG_NAME, cfg)
    for name in EXTRA_FILES + TOKENIZER_FILES:
        f = ft.file(name)
        if f is None:
            continue
        if name in TOKENIZER_FILES:
            b = base.file(name)
            if b is not None and filecmp.cmp(b, f, shallow=False):
                continue
        writer.add_file(name, f)
