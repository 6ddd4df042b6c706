"""``deltahub.compress``: stream two checkpoints tensor by tensor into a delta repo."""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from .progress import progress as progress_bar

from .calibration import Calibration, CalibrationError, read_text
from .card import human_bytes, render_card
from .chain import chain_inputs, check_same_names, parent_reference, recorded_weights, tensor_sha256
from .checkpoint import TOKENIZER_FILES, Checkpoint, CheckpointError, borrow_base, cached_snapshot, sample_digest
from . import budget as budgets
from .encoding import EncodedTensor, assemble_experts, encode_tensor, same_bits
from .errors import DeltahubError, InfeasibleRatioError, ShapeMismatchError
from .format import FINETUNED_CONFIG_NAME, DeltaWriter, make_record
from .format.repo import check_out_dir
from .memory import memory_source
from .format.dtypes import itemsize, to_torch
from .methods import Planned, get_method
from .methods.linalg import compute_device
from .planning import plan_ratios
from .distributed import LocalEncoder, TensorTask
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
    target: float | None = None  # the whole-model target ratio; None: every method at its natural size

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
            f"({f'target {budgets.fraction(self.target)}' if self.target is not None else 'natural size, no target'}; "
            f"{1 / self.ratio if self.ratio else float('inf'):.1f}x); relative error mean {self.mean_rel_error:.4f}, worst {self.max_rel_error:.4f}; "
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
    base: str | os.PathLike | None,
    finetuned: str | os.PathLike | torch.nn.Module | Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    method: str | None = None,
    ratio: float | None = 1 / 8,
    *,
    params: Mapping[str, Any] | None = None,
    rules: Iterable[Rule | str] = (),
    seed: int = 0,
    device: str = "cpu",
    revision: str | None = None,
    base_revision: str | None = None,
    base_id: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    fallback_dense: bool = True,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = 2048,
    parent: str | os.PathLike | None = None,
    parent_revision: str | None = None,
    parent_weights: Mapping[str, torch.Tensor] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> CompressResult:
    """Compress ``finetuned - base`` into a delta repo at ``out_dir``, one tensor at a time.

    ``base`` and ``finetuned`` are local folders or Hub repo ids (a PEFT adapter folder is
    refused: merge it into its base first). ``finetuned`` may also be an in-memory model or a
    state dict (:mod:`deltahub.memory`): read tensor by tensor, no copy of the model, giving
    the delta its ``save_pretrained`` folder would give (``finetuned.name_or_path`` is null).
    Tensors of one dimension are stored dense; ``rules`` (``"PATTERN=METHOD[:k=v,...]"``)
    override the method by name.

    ``ratio`` is a target for the whole repo: its stored bytes (shards, index, config) never
    exceed ``ratio`` times the dense delta's bytes. A target the method cannot reach on this
    model raises :class:`InfeasibleRatioError` before any work, naming the smallest ratio it can
    reach; nothing is written. ``ratio=None`` asks for the method's natural size, where its
    parameters decide it (``bitdelta``: 1 bit per weight; ``svd``, ``dqrelo``, ``deltacome``
    with ``rank``; ``deltadq`` with ``keep``; ``dare`` with ``p``; ``magnitude`` with
    ``density``; ``lossless`` and ``dense`` always). A matrix whose dense record is smaller than
    the method's smallest record is stored ``dense`` (listed in ``fallbacks``) unless
    ``fallback_dense=False``, as is one the method cannot fit in its share when the model can
    afford it. Nothing appears at ``out_dir`` until the whole repo is written.
    ``base_id`` (``"ORG/NAME[@REV]"``) records a Hub id for a local base, checked first against
    the Hub's safetensors headers where it answers (:func:`deltahub.base_id.check_base_id`); a
    base given as a Hugging Face cache snapshot is recorded as its repo id and commit anyway.
    ``calibration``: a text file for ``auto``'s activation-aware mode (the base model runs over
    its first ``calibration_tokens`` tokens once; see :mod:`deltahub.calibration`).

    ``method`` defaults to ``"auto"``, or ``"lossless"`` with a ``parent``.
    ``parent`` (a delta folder, or a Hub repo id at ``parent_revision``) stores the fine-tune
    against that version's decoded weights instead of the base (a chain member, spec §4.4:
    ``lossless`` only, bit-exact, and far smaller than a delta against the base when the
    two versions are a few training steps apart). ``base`` may then be ``None`` (the chain's
    keyframe's base is used to decode the parent). ``parent_weights``: the parent's decoded
    weights if you hold them (a training loop does), checked tensor by tensor against the
    parent's recorded digests instead of decoding the parent; a Hub parent is then read for its
    config only.

    ``executor="ray"`` runs the per-tensor work as Ray tasks on the cluster at ``ray_address``
    (default: ``RAY_ADDRESS``, or a local cluster), each reading its tensors from the
    checkpoints where they are; the repo is the same, byte for byte (:mod:`deltahub.distributed`;
    ``pip install deltahub[ray]``). Not with an in-memory fine-tune or a parent.

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
    if parent is None and base is None:
        raise CheckpointError("compress needs a base (a folder or Hub id), or a parent version to store the fine-tune against (parent=...)")
    if parent is None and (parent_revision is not None or parent_weights is not None):
        raise ValueError("parent_revision and parent_weights describe a parent version: pass parent=... too")
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray" and (ft_memory is not None or parent is not None):
        raise ValueError("executor='ray' reads the checkpoints on the workers: it takes a fine-tune on disk or on the Hub, stored against "
                         "the base (not a model in memory, not a parent version); drop executor='ray'")
    if ray_address is not None and executor != "ray":
        raise ValueError("ray_address is for executor='ray'")
    method = method or ("lossless" if parent is not None else "auto")
    rules = [r if isinstance(r, Rule) else Rule.parse(r) for r in rules]
    lossy = [method] if method != "lossless" else []
    lossy += [f"{r.method} (rule)" for r in rules if r.method != "lossless"]
    if parent is not None and lossy:
        raise ValueError(
            f"a version stored against its parent is bit-exact: every tensor is stored lossless, not {lossy[0].split()[0]!r}"
            f"{' (from a --rule)' if 'rule' in lossy[0] else ''}; a lossy delta goes against the base (drop parent)"
        )
    for given, role in ((finetuned, "fine-tune"), (base, "base"), (parent, "parent")):
        _refuse_adapter(given, role)
    # The output may not be, hold or lie inside an input: checked on the names given before any
    # download, and again on the folders they resolve to (Hub ids -> cache snapshots).
    check_out_dir(out_dir, overwrite, inputs=(base, finetuned, calibration, parent))
    params = dict(params or {})
    get_method(method, **params)  # unknown methods and parameters fail before any download
    policy = Policy(method, ratio, params, rules)
    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    chain: dict | None = None
    if parent is not None:
        from .sources import HubOptions

        if base_id is not None:
            raise ValueError("base_id names the base of a keyframe; a version stored against its parent carries its keyframe's base: drop base_id")
        base_ckpt, chain, base_record = parent_reference(parent, parent_revision, parent_weights, base, base_revision, HubOptions(**hub), out_dir)
    else:
        base_ckpt = Checkpoint.open(base, revision=base_revision, **hub)
        base_record = _recorded_base(base, base_ckpt, base_id, hub)  # a base_id is checked here, before any work
    ft_ckpt = ft_memory if ft_memory is not None else Checkpoint.open(finetuned, revision=revision, **hub)
    for ckpt, role in ((ft_ckpt, "fine-tune"), (base_ckpt, "base")):
        _refuse_adapter(ckpt.path, role, ckpt.source)  # a Hub repo id resolved to its snapshot
    inputs = (base, finetuned, calibration, parent, base_ckpt.path, ft_ckpt.path, *chain_inputs(base_ckpt))  # a chain: every parent and its base
    check_out_dir(out_dir, overwrite, inputs=inputs)
    _check_architectures(base_ckpt, ft_ckpt)
    if chain is not None:
        check_same_names(base_ckpt, ft_ckpt.names(), f"{ft_ckpt.source} against its parent {chain['name_or_path']}")
    _check_ratios(policy, {to_torch(ft_ckpt.info(n).dtype) for n in ft_ckpt.names()})
    budget = _model_budget(policy, base_ckpt, ft_ckpt, fallback_dense, max_shard_size, (base, finetuned))
    result = CompressResult(Path(out_dir), target=budget.target if budget else None)
    planner = get_method(method, **params)
    cal = None
    if calibration is not None:
        if not planner.plans:
            raise ValueError(f"--calibration is used by the 'auto' method only, not {method!r}; drop it or use --method auto")
        text = read_text(calibration, calibration_tokens)
        if base_ckpt.path is None or not Path(base_ckpt.path).is_dir():
            raise CalibrationError("calibration needs the base as a local folder or a downloaded Hub snapshot")
        cal = Calibration.collect(base_ckpt.path, text, max_tokens=calibration_tokens)
        cal_record = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": cal.tokens}
    runner = LocalEncoder()
    if executor == "ray":
        from .distributed import RayExecutor

        runner = RayExecutor(base_ckpt, ft_ckpt, hub, ray_address, device=device)
    try:
        # A planning method (auto) sees every tensor's statistics first and spreads the model's budget.
        planned = plan_ratios(planner, policy, base_ckpt, ft_ckpt, progress, cal, runner, budget.fixed if budget else None) if planner.plans and ratio is not None else {}
        names = ft_ckpt.names()
        removed = [n for n in base_ckpt.names() if n not in ft_ckpt]
        dtypes: dict[str, int] = {}
        total = sum(itemsize(ft_ckpt.info(n).dtype) * math.prod(ft_ckpt.info(n).shape) for n in names)
        samples: dict[str, str] = {}
        # Under Ray the driver decomposes nothing: the tasks take the device (a CPU head may drive GPU workers).
        with compute_device(device if executor == "local" else "cpu"), DeltaWriter(out_dir, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs) as writer:
            bar = progress_bar(total=total, unit="B", unit_scale=True, desc="Compressing", enabled=progress)
            for name in names:
                info = ft_ckpt.info(name)
                if to_torch(info.dtype).is_floating_point:
                    dtypes[info.dtype] = dtypes.get(info.dtype, 0) + math.prod(info.shape)

            def prepare(name: str) -> TensorTask:  # called once the tensors before a budget-dependent one are written
                info, item = ft_ckpt.info(name), budget.items.get(name) if budget is not None else None
                return TensorTask(tensor_job(name, tuple(info.shape), policy, planned.get(name), budget), seed, fallback_dense,
                                  bool(item and item.dense_instead), cal.hessian(name) if cal and name in planned else None)

            # Each tensor read (views of the files' pages), encoded and written in the checkpoint's order.
            for name, done in zip(names, runner.encoded(base_ckpt, ft_ckpt, names, prepare, lambda n: budget_dependent(n, planned.get(n), budget), device)):
                _write_one(done, name, policy, ft_ckpt, base_ckpt, budget, writer, result, samples, bar)
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
                **({"requires": ["parent"], "parent": chain} if chain is not None else {}),
                "deltahub_version": __version__,
                "base": {**base_record, "fingerprint": base_ckpt.fingerprint(), "samples": samples},
                "finetuned": {**_recorded_name(finetuned, ft_ckpt), "dtype": str(to_torch(ft_dtype)).removeprefix("torch.") if ft_dtype else None, "fingerprint": ft_ckpt.fingerprint(), "weights": recorded_weights(writer.records)},
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
            path = writer.finish(config, card=_checked_card(budget, method))
    finally:
        runner.close()
    from .format import DeltaReader

    result.stored_bytes = DeltaReader(path).config["totals"]["stored_bytes"]
    result.seconds = time.perf_counter() - t0
    return result


def _recorded_name(given: str | os.PathLike | None, ckpt: Checkpoint) -> dict:
    """``name_or_path`` and ``revision`` of a checkpoint: a Hub id as given, at the commit it
    resolved to; a Hugging Face cache snapshot as its repo id and commit (what others can
    fetch, not this machine's cache path); any other folder as an absolute path, so the delta
    loads from anywhere on this machine."""
    if given is None:
        return {"name_or_path": None, "revision": getattr(ckpt, "revision", None)}  # an in-memory fine-tune has no name
    if ckpt.revision is not None:
        return {"name_or_path": str(given), "revision": ckpt.revision}
    snapshot = cached_snapshot(ckpt.path)
    if snapshot is not None:
        return {"name_or_path": snapshot.repo_id, "revision": snapshot.revision}
    return {"name_or_path": str(Path(given).expanduser().resolve()), "revision": None}


def _recorded_base(given: str | os.PathLike, ckpt: Checkpoint, base_id: str | None, hub: dict) -> dict:
    """The base's ``name_or_path``/``revision`` (:func:`_recorded_name`), or the Hub id
    ``base_id`` with ``id_checked``, compared with the Hub where it answers
    (:func:`deltahub.base_id.check_base_id`: BaseMismatchError before any work)."""
    if base_id is None:
        return _recorded_name(given, ckpt)
    from .base_id import check_base_id, checkpoint_entries

    return check_base_id(
        base_id, ckpt.fingerprint(), checkpoint_entries(ckpt), token=hub.get("token"), local_files_only=bool(hub.get("local_files_only")),
        what=f"the base {ckpt.source}",
    ).entries()


def _check_ratios(policy: Policy, dtypes: set[torch.dtype]) -> None:
    """Fail before any work when a method can never meet its ratio (not per tensor, with fallbacks)."""
    choices = [(policy.method, policy.params, policy._ratio_for(policy.method))]
    choices += [(r.method, {k: v for k, v in r.params.items() if k != "ratio"}, r.params.get("ratio", policy._ratio_for(r.method))) for r in policy.rules]
    for method, params, ratio in choices:
        m = get_method(method, **params)
        for dt in dtypes:
            if dt.is_floating_point:
                m.check_ratio(ratio, dt)


@dataclass
class Attempt:
    """One tensor encoded, before the whole model's budget has its say: the record the method
    gave, or the method's :class:`InfeasibleRatioError` and the dense record to fall back on.
    What ``compress`` writes follows from it and the budget spent so far (:func:`_decide`)."""

    name: str
    method: str
    encoded: EncodedTensor | None
    error: InfeasibleRatioError | None = None
    dense: EncodedTensor | None = None
    # Filled by finish(): what the driver records without the tensors.
    sha256: str | None = None
    sample: str | None = None
    rel_error: float = 0.0


def tensor_job(name: str, ft_shape: tuple, policy: Policy, planned: Planned | None, budget: budgets.ModelBudget | None) -> tuple[str, dict, float | None, bool]:
    """``(method, params, ratio, count_index)`` for tensor ``name``: the plan's ratio, or its
    share of the whole model's budget (which depends on what the tensors before it took:
    :func:`budget_dependent`), or the policy's."""
    method, params, ratio = policy.resolve(name, ft_shape)
    item = budget.items.get(name) if budget is not None else None
    if planned is not None:
        return method, {**params, **planned.params}, planned.ratio, False
    if item is not None and item.scalable:
        # Its share of the whole model's budget, its lines in the index and config included.
        # (+ 0.5: floor(ratio * dense) in the encoder gives back the byte count, not one less)
        return method, params, (budget.share(name) - item.extra + 0.5) / item.dense, True
    return method, params, ratio, False


def budget_dependent(name: str, planned: Planned | None, budget: budgets.ModelBudget | None) -> bool:
    """Whether tensor ``name``'s ratio depends on the bytes the tensors before it took (a
    non-planning method at a whole-model ratio): such tensors are encoded in order."""
    item = budget.items.get(name) if budget is not None else None
    return planned is None and item is not None and item.scalable and item.fixed_ratio is None


def attempt(
    name: str, base: torch.Tensor | None, ft: torch.Tensor, job: tuple[str, dict, float | None, bool], seed: int, fallback_dense: bool,
    dense_instead: bool, hessian: torch.Tensor | None = None,
) -> Attempt:
    """Encode one tensor as ``job`` says (:func:`tensor_job`); no budget needed, so this runs anywhere."""
    method, params, ratio, count_index = job
    if not ft.is_floating_point():
        if base is not None and base.dtype == ft.dtype and torch.equal(base, ft):
            from .format.dtypes import to_name

            record, tensors = make_record("unchanged", tuple(ft.shape), to_name(ft.dtype))
            return Attempt(name, method, EncodedTensor(name, record, tensors))
        raise CheckpointError(f"tensor {name!r} is {ft.dtype} and differs from the base; deltahub stores deltas of floating-point tensors only")
    if dense_instead and base is not None:
        # Its dense record is smaller than the method's smallest one: dense is both exact and cheaper.
        enc = encode_tensor(name, base, ft, "dense", None, seed=seed)
        return Attempt(name, "dense" if enc.record["kind"] != "unchanged" else method, enc)
    try:
        return Attempt(name, method, encode_tensor(name, base, ft, method, ratio, seed=seed, hessian=hessian, count_index=count_index, **params))
    except InfeasibleRatioError as e:
        if not fallback_dense or base is None or base.shape != ft.shape:
            return Attempt(name, method, None, e)
        return Attempt(name, method, None, e, encode_tensor(name, base, ft, "dense", None, seed=seed))


def splits_by_expert(shape: tuple, job: tuple[str, dict, float | None, bool], dense_instead: bool) -> bool:
    """Whether a tensor's encode may be split by expert (:func:`attempt_from_experts`): a fused
    3-D tensor of several experts, by a method that encodes the delta block by block."""
    if len(shape) != 3 or shape[0] < 2 or dense_instead:
        return False
    m = get_method(job[0], **job[1])
    return m.kind != "dense" and not m.needs_weights


def attempt_from_experts(
    name: str, base: torch.Tensor | None, ft: torch.Tensor, job: tuple[str, dict, float | None, bool], seed: int, fallback_dense: bool,
    parts: list,
) -> Attempt:
    """:func:`attempt` for a fused 3-D tensor whose experts were encoded apart
    (:func:`deltahub.encoding.encode_experts`; ``parts`` in expert order, an
    :class:`InfeasibleRatioError` where a range did not fit): the same Attempt. Every case the
    parts cannot decide alone (an unchanged tensor, a base of another shape, an expert that did
    not fit, a non-finite weight) is the whole tensor's :func:`attempt`, as a local run does it."""
    method, params, ratio, count_index = job
    plain = (
        base is not None and ft.is_floating_point() and base.shape == ft.shape and not any(isinstance(p, BaseException) for p in parts)
        and not (base.dtype == ft.dtype and same_bits(base, ft)) and bool(torch.isfinite(base).all()) and bool(torch.isfinite(ft).all())
    )
    if not plain:
        return attempt(name, base, ft, job, seed, fallback_dense, False)
    try:
        return Attempt(name, method, assemble_experts(name, tuple(ft.shape), ft.dtype, parts, method, ratio, count_index, **params))
    except InfeasibleRatioError:
        return attempt(name, base, ft, job, seed, fallback_dense, False)


def finish(a: Attempt, base: torch.Tensor | None, ft: torch.Tensor) -> Attempt:
    """Digests and error of what the attempt encoded (both candidates' decodes are not needed:
    the dense fallback is exact)."""
    enc = a.encoded or a.dense
    if base is not None:
        a.sample = sample_digest(base)
    if enc is not None:
        decoded = enc.decode(base)
        # The decoded tensor's digest (spec §5.1): what a child version checks its parent
        # with, and what verify compares a decode with.
        a.sha256 = tensor_sha256(decoded)
        a.rel_error = relative_error(base, ft, decoded)
    return a


def _decide(a: Attempt, budget: budgets.ModelBudget | None) -> tuple[EncodedTensor, str]:
    """The record to write, given the budget spent so far: the method's, or its dense fallback
    where the method cannot fit its share and the model can afford dense."""
    if a.encoded is not None:
        return a.encoded, a.method
    if a.dense is None or (budget is not None and not budget.affords(a.name, _spent(a.dense, True, True))):
        raise _in_model(a.error, budget, a.name) from a.error
    return a.dense, "dense"


def _write_one(done: Attempt, name: str, policy: Policy, ft_ckpt, base_ckpt, budget, writer: DeltaWriter, result: "CompressResult", samples: dict, bar) -> None:
    """Write one finished tensor (in the checkpoint's order: the budget and the shards follow it)."""
    info = ft_ckpt.info(name)
    enc, used = _decide(done, budget)
    if used != policy.resolve(name, tuple(info.shape))[0]:
        result.fallbacks.append(name)
    if done.sample is not None:
        samples[name] = done.sample
    enc.record["sha256"] = done.sha256
    if budget is not None:
        budget.spend(name, _spent(enc, name in base_ckpt, name in result.fallbacks))
    writer.add(name, enc.record, enc.tensors)
    kind = enc.record["kind"]
    report_method = None if kind == "unchanged" else enc.record.get("method", used)
    stored = 0 if kind == "unchanged" else enc.nbytes
    result.tensors.append(TensorReport(name, kind, report_method, tuple(info.shape), enc.dense_nbytes, stored, done.rel_error))
    bar.update(enc.dense_nbytes)
    bar.set_postfix_str(name[-40:], refresh=False)


def _in_model(e: InfeasibleRatioError, budget: budgets.ModelBudget | None, name: str) -> InfeasibleRatioError:
    """A tensor's error with the model's budget around it (the tensor that makes the target infeasible)."""
    if budget is None:
        return e
    return InfeasibleRatioError(
        f"{e}. At the target {budgets.fraction(budget.target)} for the whole model this tensor's share is {budget.share(name)} bytes, "
        f"and storing it dense would leave the other tensors less than their smallest records: raise the target, or store {name!r} "
        "another way with a rule (--rule 'PATTERN=dense' or a method with a natural size)"
    )


def _spent(enc: EncodedTensor, in_base: bool, fallback: bool) -> int:
    """What a written tensor costs the repo: its record, its index lines, its config lines."""
    name = enc.name
    return enc.nbytes + enc.index_nbytes + (budgets.samples_line(name) if in_base else 0) + (budgets.fallback_line(name) if fallback else 0)


def _model_budget(policy: Policy, base: Checkpoint, ft: Checkpoint, fallback_dense: bool, max_shard_size: int | str, given: tuple) -> budgets.ModelBudget | None:
    """The whole model's budget at the policy's target (None: natural sizes), refused before any
    work when even every tensor's smallest record exceeds it."""
    names_given = tuple(str(g) for g in given) + tuple(str(c.path) for c in (base, ft))
    budget = budgets.plan(policy, base, ft, fallback_dense, max_shard_size, names_given)
    if budget is None or budget.feasible():
        return budget
    # Planned as if every tensor changed. An unchanged tensor costs only its record's line, so
    # find those (one read of the pair) before calling the target unreachable.
    for name, item in budget.items.items():
        if item.scalable or item.dense_instead:
            with ft.borrow(name) as f, borrow_base(base, name) as b:
                if b is not None and b.shape == f.shape and b.dtype == f.dtype and same_bits(b, f):
                    dt = f.dtype
                    item.floor = budgets.unchanged_cost(name, tuple(f.shape), dt) + budgets.samples_line(name)
                    item.scalable = item.dense_instead = False
    if not budget.feasible():
        raise budgets.infeasible(budget, policy.method)
    return budget


def _checked_card(budget: budgets.ModelBudget | None, method: str):
    """The card renderer, which first checks the finished repo's honest bytes against the target:
    the writer calls it before installing the repo, so an overshoot leaves nothing behind."""

    def card(cfg: dict) -> str:
        totals = cfg["totals"]
        stored, dense = totals["stored_bytes"], totals["dense_bytes"]
        if budget is not None and stored > math.floor(budget.target * dense):
            achieved = stored / dense
            m = get_method(method)
            raise InfeasibleRatioError(
                f"{method} stored {achieved:.4f} of the dense delta, over the target {budgets.fraction(budget.target)} "
                f"({stored} bytes for {math.floor(budget.target * dense)} allowed); nothing was written. Raise the target to at least "
                f"--ratio {budgets.round_up(achieved)} (ratio={budgets.round_up(achieved)})" + (f", or ask for {m.natural}" if m.natural else "")
            )
        return render_card(cfg)

    return card


ADAPTER_CONFIG = "adapter_config.json"
_MODEL_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _refuse_adapter(given: str | os.PathLike | None, role: str, source: str | None = None) -> None:
    """Refuse a PEFT adapter folder (``adapter_config.json`` and adapter weights, no model
    weights) given as a model: read as one it would make a delta of added and removed tensors."""
    if given is None:
        return
    folder = Path(given).expanduser()
    try:
        if not (folder / ADAPTER_CONFIG).is_file():
            return
        files = [p.name for p in folder.iterdir()]
    except OSError:
        return
    if any(f in _MODEL_WEIGHTS or (f.endswith(".safetensors") and not f.startswith(("adapter_model", "delta-"))) for f in files):
        return  # a full model that also carries an adapter's config
    weights = sorted(f for f in files if f.startswith("adapter_model"))
    base = "BASE"
    try:
        from .format.limits import read_json

        named = read_json(folder / ADAPTER_CONFIG, f"{source or given}/{ADAPTER_CONFIG}").get("base_model_name_or_path")
        if isinstance(named, str) and re.fullmatch(r"[\w./@:~+-]{1,200}", named):
            base = named
    except (DeltahubError, OSError, AttributeError):
        pass  # the hint is optional; the refusal is what matters
    raise CheckpointError(
        f"{source or given}: the {role} is a PEFT adapter ({', '.join([ADAPTER_CONFIG, *weights])}), not a model; deltahub stores "
        f"the difference between two full models. Merge the adapter into its base first: "
        f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{source or given}').merge_and_unload().save_pretrained('MERGED'), "
        f"then compress {base} MERGED; or serve the LoRA adapter as it is (PEFT, vLLM), which is already small"
    )


def _copy_extra_files(writer: DeltaWriter, base: Checkpoint, ft: Checkpoint) -> None:
    """The fine-tune's ``config.json`` (as ``finetuned_config.json``), ``generation_config.json``
    and tokenizer files, whenever the fine-tune has them, even when they equal the base's: the
    delta repo is then self-contained (``AutoTokenizer.from_pretrained(delta)`` and pipelines
    work on a delta id). They are a few MB at most, and not counted in ``stored_bytes``. A
    fine-tune with no tokenizer files at all (a training checkpoint) gets the base's: it reads
    text as its base does, and vLLM and pipelines need them."""
    cfg = ft.file("config.json")
    if cfg is not None:
        writer.add_file(FINETUNED_CONFIG_NAME, cfg)
    own_tokenizer = any(ft.file(name) is not None for name in TOKENIZER_FILES)
    for name in EXTRA_FILES + TOKENIZER_FILES:
        f = ft.file(name)
        if f is None and name in TOKENIZER_FILES and not own_tokenizer and hasattr(base, "file"):
            f = base.file(name)
        if f is not None:
            writer.add_file(name, f)
