"""``deltahub.export_lora``: a delta as a PEFT LoRA adapter that PEFT and vLLM load.

Every matrix a delta changes in an ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding`` module
becomes a LoRA pair with ``B·A`` equal to the delta (PEFT's layout: ``lora_A`` ``[r, in]``,
``lora_B`` ``[out, r]``, ``lora_embedding_A`` ``[r, num_embeddings]``, ``lora_embedding_B``
``[dim, r]``):

- a record made of ``lowrank`` components (``svd``, ``deltacome``, ``auto``'s low-rank family,
  float or quantized factors) is exported exactly: the stored factors dequantized,
  ``B = U·diag(S)``, ``A = Vᵀ`` (the spec's ``U·S`` product, rounded once to float32, as the
  decoder computes it);
- a record of low-rank factors plus a 1-bit ``sign`` part (``dqrelo``, ``auto``'s sign part) has
  its low-rank part exported exactly; the sign part, full-rank noise a LoRA cannot hold at low
  rank, is left out, and the module's relative error is what leaving it out costs;
- any other record (sparse, sign only, dense, lossless) is decoded (against the base only for
  ``lossless``) and truncated by SVD to ``rank``, or by default to the rank whose factors take as
  many bytes as the record does in the delta.

The relative Frobenius error of every module is reported; modules above ``WARN_ERROR`` (0.1)
are listed as a warning in the report's text.

Ranks differ per module: PEFT reads them from ``rank_pattern``; ``lora_alpha`` equals the
rank everywhere (``alpha_pattern``, and the global ``r``/``lora_alpha`` pair), so the LoRA scale
is 1 both in PEFT and in loaders that read only ``r`` and ``lora_alpha`` (vLLM). Tensors a LoRA
adapter cannot hold (norms, biases, MoE routers and fused experts, resized vocabularies) are
listed in the report with their share of the delta; they are not in the adapter.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from ..progress import progress as progress_bar

from ..format import CONFIG_NAME, DeltaReader
from ..format.components import LowRank, block_shape, matrix_view
from ..format.dtypes import parse_user_dtype
from ..format.records import delta_from_components, record_nbytes, validate_record
from ..format.repo import atomic_dir, check_out_dir
from ..methods.linalg import truncated_svd
from ..sources import HubOptions, check_model_size, one_line, open_base, open_delta
from ..errors import FormatError
from .errors import ServingError, refuse_chain
from .layers import DeltaConv1D, DeltaEmbedding, DeltaLinear
from .model import _fast_wrapper, _users
from .operators import stored_components

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_NAME = "deltahub_lora_report.json"
# A module whose adapter is further than this (relative Frobenius error) from the delta is warned about.
WARN_ERROR = 0.1
# The values vLLM accepts for --max-lora-rank (vllm/config/lora.py, vLLM 0.32).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraModule:
    """One exported module: its path, the delta tensor it holds, its rank and error."""

    module: str
    tensor: str
    kind: str  # "linear", "conv1d" or "embedding"
    rank: int
    rel_error: float
    exact: bool
    # "factors": the stored low-rank factors; "factors, sign part left out"; "truncated SVD"
    source: str = "truncated SVD"


@dataclass
class SkippedTensor:
    """A changed tensor the adapter does not hold, and its share of the delta (squared norm)."""

    name: str
    shape: list[int]
    reason: str
    share: float


@dataclass
class LoraExportReport:
    """What :func:`export_lora` wrote and how close the adapter is to the delta."""

    path: Path
    modules: list[LoraModule] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)
    rel_error: float = 0.0
    skipped_share: float = 0.0
    adapter_bytes: int = 0
    delta_bytes: int | None = None

    warn_above: float = WARN_ERROR

    @property
    def exact(self) -> bool:
        """Every exported module came from a stored low-rank factorization, untruncated."""
        return bool(self.modules) and all(m.exact for m in self.modules)

    @property
    def max_rank(self) -> int:
        """The largest rank of any module (0 with none)."""
        return max((m.rank for m in self.modules), default=0)

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The smallest ``--max-lora-rank`` vLLM accepts that holds this adapter (None above 512)."""
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= self.max_rank), None)

    @property
    def warnings(self) -> list[LoraModule]:
        """Modules whose relative error is above ``warn_above``, worst first."""
        return sorted((m for m in self.modules if m.rel_error > self.warn_above), key=lambda m: -m.rel_error)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["exact"] = self.exact
        out["warnings"] = [m.module for m in self.warnings]
        out["vllm_max_lora_rank"] = self.vllm_max_lora_rank
        return out

    def _sources(self) -> str:
        counts: dict[str, int] = {}
        for m in self.modules:
            counts[m.source] = counts.get(m.source, 0) + 1
        return ", ".join(f"{n} from {s}" if s != "truncated SVD" else f"{n} by truncated SVD" for s, n in sorted(counts.items()))

    def __str__(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no modules"
        lines = [
            f"{self.path}: {len(self.modules)} LoRA modules ({rank_text}), {self.adapter_bytes / 1e6:.2f} MB"
            + (f" for a {self.delta_bytes / 1e6:.2f} MB delta" if self.delta_bytes else "")
            + f"; relative error {self.rel_error:.4g}" + (" (exact: stored low-rank factors)" if self.exact else f" ({self._sources()})"),
        ]
        worst = sorted(self.modules, key=lambda m: -m.rel_error)[:3]
        if worst and not self.exact:
            lines.append("worst modules: " + ", ".join(f"{m.module} {m.rel_error:.3f} (rank {m.rank})" for m in worst))
        signed = [m for m in self.modules if m.source == "factors, sign part left out"]
        if signed:
            lines.append(
                f"{len(signed)} module(s) store a 1-bit sign part besides their factors; LoRA cannot hold it at low rank, so it is left out "
                f"(relative error of leaving it out: up to {max(m.rel_error for m in signed):.3f}); the low-rank part is exact"
            )
        warned = self.warnings
        if warned:
            names = ", ".join(f"{m.module} {m.rel_error:.3f}" for m in warned[:4]) + (f" and {len(warned) - 4} more" if len(warned) > 4 else "")
            lines.append(f"warning: {len(warned)} module(s) have a relative error above {self.warn_above:g}, so the adapter differs from the delta there ({names}); "
                         "a higher --rank exports a truncated SVD closer; a delta made with svd, deltacome, or auto with lora=true (--param lora=true), exports exactly")
        if self.skipped:
            names = ", ".join(s.name for s in self.skipped[:4]) + (f" and {len(self.skipped) - 4} more" if len(self.skipped) > 4 else "")
            lines.append(f"not expressible as LoRA: {len(self.skipped)} tensor(s), {self.skipped_share:.2%} of the delta's squared norm ({names})")
        if self.modules:
            rank = self.vllm_max_lora_rank
            lines.append(f"vLLM: --enable-lora --max-lora-rank {rank}" if rank else f"vLLM: rank {self.max_rank} is above the largest --max-lora-rank vLLM accepts (512); export with --rank 512 or less")
        return "\n".join(lines)


def _meta_model(reader: DeltaReader):
    """The fine-tune's architecture on the meta device (no memory): which module each tensor is in."""
    from ..format import FINETUNED_CONFIG_NAME
    from ..model import finetuned_config, model_class  # deltahub.model imports this package

    config = finetuned_config(reader)
    where = f"{getattr(reader, 'source', reader.path)}/{FINETUNED_CONFIG_NAME}"
    arch = model_class(config, where)
    # The config comes with the delta: the model it describes must fit the delta's weights before
    # anything is built (check_model_size builds it on the meta device, buffers included, which
    # accelerate's init_empty_weights would still allocate on the CPU).
    check_model_size(arch, config, None, reader, where)
    try:
        with torch.device("meta"):
            model = arch._from_config(config)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a hostile config
        raise FormatError(f"{where}: transformers cannot build the model it describes ({type(e).__name__}: {one_line(e)}); the config is corrupted or hostile") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model, config


_KINDS = {DeltaLinear: "linear", DeltaConv1D: "conv1d", DeltaEmbedding: "embedding"}


def _kind(module: nn.Module, param: str) -> str | None:
    """``"linear"``, ``"conv1d"`` or ``"embedding"`` when ``module.<param>`` is such a layer's weight."""
    return _KINDS.get(_fast_wrapper(module)) if param == "weight" else None  # type: ignore[arg-type]


def _stored_lowrank(name: str, record: dict, reader: DeltaReader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None:
    """``(U·S [p, r], S [r], V [q, r], signed)`` when the (validated) record is low-rank
    components over the whole matrix (float or quantized factors, dequantized as the decoder
    does), possibly with a 1-bit sign part (``signed``, which these factors leave out);
    ``None`` otherwise. Several low-rank components are concatenated along the rank."""
    comps = record.get("components") or []
    if record["kind"] != "compressed" or len(record["shape"]) != 2 or not comps:
        return None
    shape = tuple(record["shape"])
    types = [c["type"] for c in comps]
    if "lowrank" not in types or not set(types) <= {"lowrank", "sign"}:
        return None
    if any("rows" in c or matrix_view(block_shape(shape, c), c) != shape for c in comps):
        return None
    us, ss, vs = [], [], []
    for meta, comp in zip(comps, stored_components(name, record, reader.get)):
        if meta["type"] != "lowrank":
            continue
        try:
            u = LowRank.factor(meta, comp.tensors, "u", shape[0])  # [r, p], dequantized
            v = LowRank.factor(meta, comp.tensors, "v", shape[1])  # [r, q]
        except FormatError as e:  # coded codes that do not decompress: name the tensor
            raise type(e)(f"{CONFIG_NAME}: tensor {name!r} component {comps.index(meta)} (lowrank): {e}") from None
        s = comp.tensors["s"].to(torch.float32)
        us.append(u.t() * s)
        ss.append(s)
        vs.append(v.t())
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1).contiguous(), "sign" in types


def _dense_delta(name: str, record: dict, reader: DeltaReader, base_tensor) -> torch.Tensor:
    """The decoded delta of a (validated) record in float32: the components' sum (for an added
    or resized tensor, what it adds to the zero-padded base); lossless: fine-tune minus base."""
    if record["components"][0]["type"] == "lossless":
        base = base_tensor()
        return reader.decode(name, base).to(torch.float32) - base.to(torch.float32)
    return delta_from_components(tuple(record["shape"]), stored_components(name, record, reader.get))


def export_lora(
    delta: str | os.PathLike,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    rank: int | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    embeddings: bool = True,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    verify_base: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> LoraExportReport:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors``: the delta as a
    PEFT LoRA adapter for its base model.

    Exact for records stored as low-rank factors (``svd``, ``deltacome``, ``auto``'s low-rank
    family; quantized factors are dequantized) when ``rank`` is ``None`` or at least their
    stored rank; a ``dqrelo``-style sign part beside the factors is left out and its cost
    reported (the module's relative error). Otherwise each matrix is a truncated SVD of the
    decoded delta at ``rank`` (default: the rank whose factors, in ``dtype``, take the record's
    stored bytes); modules further than ``WARN_ERROR`` from the delta are warned about in the
    report's text (``report.warnings``). ``dtype`` is the adapter's (float32 keeps the exact case exact).
    ``embeddings=False`` leaves embeddings and tied LM heads out (for loaders without embedding
    LoRA). The base is read only for ``lossless`` records. Written atomically.

    Example::

        report = deltahub.export_lora("user/qwen-delta", "qwen-lora", rank=64)
        print(report)   # ranks, relative errors, tensors LoRA cannot hold
        # PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "qwen-lora")
    """
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ServingError(f"rank must be a positive integer, got {rank!r}")
    out = check_out_dir(out_dir, overwrite, inputs=(delta, base))  # refused before any work
    adapter_dtype = parse_user_dtype(dtype)
    if not adapter_dtype.is_floating_point:
        raise ServingError(f"the adapter dtype must be a float dtype, got {dtype!r}")
    hub = HubOptions(token, cache_dir, local_files_only)
    reader = open_delta(delta, revision, hub)
    refuse_chain(reader, "exported as a LoRA adapter of the base")
    # Again with what the delta resolved to (its cache folder) and the base it records, before
    # any work: an export must not land on either.
    recorded = reader.config.get("base", {}).get("name_or_path")
    check_out_dir(out, overwrite, inputs=(delta, base, reader.path, recorded))
    model, config = _meta_model(reader)
    # A module shared under several paths is one PEFT target, under the first path (the one
    # PEFT's own ``named_modules()`` walk finds); its parameters have a name under every path.
    path_of = {id(m): mname for mname, m in model.named_modules()}
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    where: dict[str, int] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m._parameters.items():
            if p is not None:
                if (m, pname) not in holders.setdefault(id(p), []):
                    holders[id(p)].append((m, pname))
                where[f"{mname}.{pname}" if mname else pname] = id(p)
    base_ckpt = None

    def base_tensor(name: str):
        nonlocal base_ckpt
        if base_ckpt is None:
            # Opened (and checked) only when a lossless record needs it, so not with open_pair.
            base_ckpt = open_base(reader, base, base_revision, hub, verify=verify_base)
        return base_ckpt.get(name)

    report = LoraExportReport(out, delta_bytes=(reader.config.get("totals") or {}).get("stored_bytes"))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    err2 = norm2 = skipped2 = 0.0
    any_conv = False
    changed = [(n, r) for n, r in reader.records.items() if r["kind"] not in ("unchanged", "removed")]
    for name, record in progress_bar(changed, desc="Exporting", enabled=progress):
        validate_record(name, record)
        shape = list(record["shape"])
        targets = []
        reason = None
        if record["kind"] == "added" or record.get("base_shape") is not None:
            reason = "the tensor is added or resized: LoRA only changes existing weights"
        elif name not in where:
            reason = "not a parameter of the model class (a renamed checkpoint key)"
        elif len(shape) != 2:
            reason = f"{len(shape)}-D tensor (norm, bias or fused experts)"
        else:
            users = [(path_of[id(m)], _kind(m, pname)) for m, pname in _users(holders[where[name]])]
            targets = [(mname, kind) for mname, kind in users if kind is not None]
            if not embeddings and any(kind == "embedding" for _, kind in targets):
                # A tied LM head alone would carry half of the change: both or neither.
                targets, reason = [], "embedding (and any LM head tied to it) left out: embeddings=False"
            elif not targets:
                reason = "not the weight of a Linear, Conv1D or Embedding module"
            elif len(targets) < len(users):
                other = next(mname for mname, kind in users if kind is None)
                targets, reason = [], f"tied to {other}, which is no Linear, Conv1D or Embedding: the adapter would apply the change in only some of the modules that use it"
        if reason is not None:
            d2 = float(_dense_delta(name, record, reader, lambda: base_tensor(name)).double().pow(2).sum())
            skipped2 += d2
            report.skipped.append(SkippedTensor(name, shape, reason, d2))
            continue
        p, q = shape
        stored = _stored_lowrank(name, record, reader)
        dense = _dense_delta(name, record, reader, lambda: base_tensor(name))
        d_norm2 = float(dense.double().pow(2).sum())
        # Exact: the stored factors, untruncated, written in a dtype that holds U·S (float32),
        # with no sign part left out.
        whole = stored is not None and (rank is None or rank >= stored[1].numel())
        exact = whole and not stored[3] and adapter_dtype.itemsize >= 4
        source = "truncated SVD" if stored is None else "factors, sign part left out" if stored[3] else "factors"
        if whole:
            us, s, v, _ = stored
        else:
            if rank is not None:
                r = min(rank, p, q)
            else:
                r = max(1, min(p, q, record_nbytes(name, record) // ((p + q) * adapter_dtype.itemsize)))
            if stored is not None:  # truncating the stored factorization: keep its largest singular values
                us_all, s_all, v_all, _ = stored
                top = torch.argsort(s_all, descending=True)[:r]
                us, s, v = us_all[:, top], s_all[top], v_all[:, top]
            else:
                u, s, v = truncated_svd(dense, r)
                us = u * s
        # The error of the factors as written (in the adapter's dtype), not of their float32 form.
        us, v = us.to(adapter_dtype), v.to(adapter_dtype)
        approx = us.to(torch.float32) @ v.to(torch.float32).t()
        e2 = float((dense - approx).double().pow(2).sum())
        err2 += e2
        norm2 += d_norm2
        rel = math.sqrt(e2 / d_norm2) if d_norm2 else (0.0 if e2 == 0 else math.inf)
        r = s.numel()
        for mname, kind in targets:
            prefix = f"base_model.model.{mname}"
            if kind == "linear":  # weight [out=p, in=q]: B·A = Δ
                tensors[f"{prefix}.lora_A.weight"] = v.t()
                tensors[f"{prefix}.lora_B.weight"] = us
            elif kind == "conv1d":  # weight [in=p, out=q]: B·A = Δᵀ
                any_conv = True
                tensors[f"{prefix}.lora_A.weight"] = us.t()
                tensors[f"{prefix}.lora_B.weight"] = v
            else:  # embedding [num=p, dim=q]: PEFT's delta is (B·A)ᵀ
                tensors[f"{prefix}.lora_embedding_A"] = us.t()
                tensors[f"{prefix}.lora_embedding_B"] = v
            ranks[mname] = r
            report.modules.append(LoraModule(mname, name, kind, r, rel, exact, source))
    total2 = norm2 + skipped2
    report.rel_error = math.sqrt(err2 / norm2) if norm2 else 0.0
    report.skipped_share = skipped2 / total2 if total2 else 0.0
    for s in report.skipped:
        s.share = s.share / total2 if total2 else 0.0
    if not tensors:
        raise ServingError(f"{reader.path}: no tensor of this delta is the weight of a Linear, Conv1D or Embedding module; there is nothing to export as LoRA")
    r_max = max(ranks.values())
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _task_type(config),
        "base_model_name_or_path": str(base) if base is not None else (reader.config.get("base") or {}).get("name_or_path"),
        "revision": None if base is not None else (reader.config.get("base") or {}).get("revision"),
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != r_max},
        "alpha_pattern": {m: r for m, r in sorted(ranks.items()) if r != r_max},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any_conv,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    _write(out, overwrite, {k: t.contiguous() for k, t in tensors.items()}, adapter_config, report)
    return report


def _task_type(config) -> str | None:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "CAUSAL_LM"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "SEQ_CLS"
    if any(a.endswith("ForTokenClassification") for a in archs):
        return "TOKEN_CLS"
    return None


def _write(out: Path, overwrite: bool, tensors: dict[str, torch.Tensor], config: dict, report: LoraExportReport) -> None:
    with atomic_dir(out, overwrite, inputs=(config.get("base_model_name_or_path"),)) as tmp:  # the recorded base too
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        report.adapter_bytes = (tmp / ADAPTER_WEIGHTS).stat().st_size
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
