"""A ``transformers.TrainerCallback`` that keeps a training run's checkpoints as versions of a
delta repo on the Hub, each stored against the previous version (spec/FORMAT.md §4.4).

Between two nearby checkpoints most bf16 weights do not change at all, so a bit-exact delta
against the previous version is a fraction of a delta against the base. Every
``keyframe_every``-th version is stored against the base instead, so that any version loads by
decoding at most ``keyframe_every`` deltas.

Example::

    from deltahub.integrations import DeltaCallback

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[DeltaCallback("me/run-42", base="HuggingFaceTB/SmolLM2-135M", every=200)])
    trainer.train()   # versions step-200, step-400, ... on the Hub, each loadable with
                      # DeltaModel.from_pretrained("me/run-42", revision="step-400")

TRL's trainers are Trainers, so the callback works there unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from ..errors import DeltahubError

try:  # the callback is a TrainerCallback when transformers is there (it always is with deltahub)
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]


logger = logging.getLogger(__name__)


class VersionError(DeltahubError):
    """The callback cannot version this run (a tag that is taken, no trigger), or versions
    failed to upload: raised before training, or at its end naming the versions and where they
    are kept."""


class DeltaCallback(TrainerCallback):
    """Push the model as a version of ``repo_id`` on each save (or every ``every`` steps).

    Each version is encoded from the model's weights in memory (no checkpoint is written
    first) into a temporary folder and uploaded in a background thread while training goes on.
    Training waits only for the encode (and for the previous upload, when it is still running
    then). A failed upload is tried again at the next version (or at the end of training); if
    it fails again, :class:`VersionError` is raised there.

    - ``base``: the base model (Hub id; a local folder needs ``allow_local_base=True`` to push).
    - ``method``/``ratio``: how keyframes (versions stored against the base) are compressed.
      The default, ``lossless``, keeps every version bit-exact. With a lossy method only the
      keyframes are lossy: the versions after one are stored exactly against what it decodes
      to, so they are exact.
    - ``keyframe_every``: a keyframe every that many versions (1: every version against the
      base, no chain).
    - ``dtype``: the dtype the versions store (default: the model's, e.g. float32 for a model
      trained in float32; ``torch.bfloat16`` stores what ``save_pretrained`` in bf16 would).
    - ``tag``: the tag of each version, formatted with ``step`` (default ``"step-{step}"``).
      Resuming a run from an earlier checkpoint while later versions are on the Hub is refused
      before training (their tags are taken): pass another ``tag`` (``"resume-step-{step}"``).
    - ``on_error``: what a version that cannot be uploaded does. It is logged as a warning at
      once and tried again at the next version; if that fails too, training goes on (the next
      version is a keyframe) and the version stays in ``work_dir``. At the end of training,
      ``"raise"`` (default) raises :class:`VersionError` listing those versions and the command
      that pushes each; ``"warn"`` only logs them.
    - ``work_dir``: where versions are written before upload (default: a temporary folder,
      removed at the end, except for versions that failed to upload).

    The commit message carries the step, the epoch and the last logged metrics. Run it on one
    process (it acts on the main process only, with the full model in its memory: not under
    FSDP or DeepSpeed ZeRO-3, whose parameters are sharded).
    """

    def __init__(
        self,
        repo_id: str,
        base: str | os.PathLike,
        *,
        method: str = "lossless",
        ratio: float | None = None,
        every: int | None = None,
        keyframe_every: int = 8,
        dtype: torch.dtype | None = None,
        tag: str = "step-{step}",
        private: bool | None = None,
        token: str | bool | None = None,
        allow_local_base: bool = False,
        base_id: str | None = None,
        on_error: str = "raise",
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        from ..checkpoint import cached_snapshot
        from ..methods import get_method

        if every is not None and every < 1:
            raise ValueError(f"every must be a number of steps >= 1 (or None: on each save), got {every}")
        if not 1 <= keyframe_every <= 64:
            raise ValueError(f"keyframe_every must be from 1 to 64 (MAX_CHAIN_DEPTH + 1), got {keyframe_every}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        get_method(method)  # an unknown method fails here, not at the first version
        _check_tag_format(tag)
        if Path(base).expanduser().is_dir() and cached_snapshot(base) is None and base_id is None and not allow_local_base:
            raise ValueError(
                f"base {str(base)!r} is a local folder, so nobody who pulls the versions could fetch it: pass its Hub id as well, "
                "DeltaCallback(..., base_id='ORG/NAME@REVISION'), or allow_local_base=True to push anyway"
            )
        self.repo_id, self.base, self.method, self.ratio = repo_id, base, method, ratio
        self.every, self.keyframe_every, self.dtype, self.tag = every, keyframe_every, dtype, tag
        self.private, self.token, self.allow_local_base, self.base_id = private, token, allow_local_base, base_id
        self.on_error, self._work_dir = on_error, Path(work_dir) if work_dir is not None else None
        self.failed: list[dict[str, Any]] = []  # versions that could not be uploaded: step, tag, folder, error
        self.versions: list[dict[str, Any]] = []  # step, tag, commit, stored_bytes, parent, seconds
        self._reference: dict[str, torch.Tensor] | None = None  # the last version's decoded weights
        self._parent_commit: str | None = None
        self._since_keyframe = 0
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed_step: int | None = None
        self._work: Path | None = None  # made at the first version
        self._last_step: int | None = None
        self._warned_dtype = False

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Before the first step: a run with no trigger, or resumed under versions that already
        hold this run's tags, is refused now rather than after hours of training."""
        if not state.is_world_process_zero:
            return
        if self.every is None and str(getattr(args, "save_strategy", "")).split(".")[-1].lower() == "no":
            raise VersionError("DeltaCallback(every=None) makes a version at each save, and save_strategy is 'no': pass every=N, or save_strategy='steps'")
        taken = self._taken_tags()
        later = sorted((self._step_of(t), t) for t in taken if (self._step_of(t) or 0) > state.global_step)
        if later:
            raise VersionError(
                f"{self.repo_id} already has versions after step {state.global_step}, where this run starts ({', '.join(t for _, t in later[:3])}"
                f"{' ...' if len(later) > 3 else ''}): this run's versions would need those tags. Pass another tag, e.g. "
                "DeltaCallback(..., tag='resume-step-{step}'), or another repo"
            )

    def _taken_tags(self) -> list[str]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            return [t.name for t in HfApi(token=self.token).list_repo_refs(self.repo_id).tags]
        except RepositoryNotFoundError:
            return []

    def _step_of(self, tag: str) -> int | None:
        """The step a tag of this callback's format stands for (None for other tags)."""
        head, _, tail = self.tag.partition("{step}")
        if tag.startswith(head) and tag.endswith(tail) and tag[len(head): len(tag) - len(tail) or None].isdigit():
            return int(tag[len(head): len(tag) - len(tail) or None])
        return None

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.every is None and state.is_world_process_zero:
            self._version(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0 and state.is_world_process_zero:
            self._version(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.every is not None and self._last_step != state.global_step and model is not None:
            self._version(state, model)  # the final weights, when the last step was not a multiple of every
        self.wait()
        self._finish()

    def _finish(self) -> None:
        """Remove the work folder but for the versions that failed; say (or raise) which."""
        if self._work is not None:
            _remove_unless_kept(self._work, self.failed, keep_folder=self._work_dir is not None)
        if self.failed:
            lines = "; ".join(f"step {f['step']} ({f['error']}): deltahub push {f['folder']} {self.repo_id} --tag {f['tag']}" for f in self.failed)
            text = f"{len(self.failed)} version(s) of {self.repo_id} could not be uploaded and are kept: {lines}"
            if self.on_error == "raise":
                raise VersionError(text)
            logger.warning(text)

    # ------------------------------------------------------------------ work

    def wait(self) -> None:
        """Wait for the upload in flight. One that failed is tried once more, here (a Hub that
        was briefly unreachable); if that fails too, the version is kept in the work folder
        (:attr:`failed`) and the next version is a keyframe (it cannot stand on a version that is
        not on the Hub)."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        if self._error is not None:
            self._error = None
            self._push(*self._pending)
            if self._error is not None:
                error, self._error = self._error, None
                folder, tag, _, step, _ = self._pending
                self.failed.append({"step": step, "tag": tag, "folder": str(folder), "error": str(error).splitlines()[0][:300]})
                logger.warning("deltahub: the version of step %s for %s failed twice (%s); it is kept in %s, and the next version is a keyframe",
                               step, self.repo_id, str(error).splitlines()[0][:300], folder)
                self._reference, self._parent_commit = None, None

    def _version(self, state, model) -> None:
        from ..memory import MemoryCheckpoint

        if model is None:
            raise VersionError("the Trainer passed no model to the callback; DeltaCallback needs the model being trained")
        self.wait()  # the parent's commit is needed, and an earlier failure is tried again now
        step = state.global_step
        self._last_step = step
        if self._work is None:
            self._work = self._work_dir or Path(tempfile.mkdtemp(prefix="deltahub-versions-"))
            self._work.mkdir(parents=True, exist_ok=True)
            if self._work_dir is None:  # whatever happens to the run, the temporary folder goes at exit (but failed versions)
                weakref.finalize(self, _remove_unless_kept, self._work, self.failed)
        ckpt = MemoryCheckpoint.from_model(_unwrapped(model))
        if self.dtype is not None:
            ckpt = ckpt.cast(self.dtype)
        self._warn_dtype(ckpt)
        keyframe = self._reference is None or self._since_keyframe + 1 >= self.keyframe_every
        out = self._work / f"step-{step}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            result = self._compress(ckpt, out, keyframe)
        except DeltahubError as e:
            if keyframe:
                raise
            # The parent could not be read back (a Hub that just went away): a keyframe instead.
            logger.warning("deltahub: the version of step %s cannot be stored against its parent (%s); storing it against the base",
                           step, str(e).splitlines()[0][:300])
            keyframe = True
            shutil.rmtree(out, ignore_errors=True)
            result = self._compress(ckpt, out, keyframe)
        # What this version decodes to, the next version's reference: the weights themselves when
        # the version is exact, else decoded from what was written (a lossy keyframe).
        reference = _copies(ckpt) if result.max_rel_error == 0 else _decoded(out, self.base)
        message = _message(state)
        tag = self.tag.format(step=step)
        entry = {"step": step, "tag": tag, "stored_bytes": result.stored_bytes, "keyframe": keyframe, "encode_seconds": result.seconds}
        self.versions.append(entry)
        self._reference = reference
        self._since_keyframe = 0 if keyframe else self._since_keyframe + 1
        self._pending = (out, tag, message, step, entry)
        self._upload = threading.Thread(target=self._push, args=self._pending, name=f"deltahub-push-{step}", daemon=True)
        self._upload.start()

    def _warn_dtype(self, ckpt) -> None:
        """Once: versions in float32 of a bf16 base are larger than a bf16 copy of the model."""
        if self._warned_dtype or self.dtype is not None:
            return
        self._warned_dtype = True
        from ..checkpoint import Checkpoint

        try:
            base = Checkpoint.open(self.base, token=self.token)
        except DeltahubError:
            return  # the keyframe's compress says what is wrong with the base
        floats = [n for n in ckpt.names() if n in base and base.info(n).dtype != ckpt.info(n).dtype]
        if floats:
            n = floats[0]
            warnings.warn(
                f"DeltaCallback: the model's weights are {ckpt.info(n).dtype} and the base's {base.info(n).dtype} ({n}); versions store the "
                f"model's dtype, which can make them larger than a copy in the base's dtype. Pass dtype=torch.bfloat16 (or the base's dtype) "
                "to store what save_pretrained in that dtype would write", stacklevel=3,
            )

    def _compress(self, ckpt, out: Path, keyframe: bool):
        from ..compress import compress

        if keyframe:
            return compress(self.base, ckpt, out, method=self.method, ratio=self.ratio, base_id=self.base_id, progress=False)
        return compress(
            None, ckpt, out, method="lossless", ratio=None, parent=self.repo_id, parent_revision=self._parent_commit,
            parent_weights=self._reference, token=self.token, progress=False,
        )

    def _push(self, folder: Path, tag: str, message: str, step: int, entry: dict) -> None:
        from ..hub import push

        from ..hub import UntaggedPushError

        try:
            try:
                result = push(folder, self.repo_id, tag=tag, message=message, private=self.private, token=self.token, allow_local_base=self.allow_local_base)
            except UntaggedPushError as e:  # the commit landed, only its tag is missing: it counts
                result = e.result
                logger.warning("deltahub: the version of step %s landed as %s but could not be tagged %s: %s", step, result.commit, tag, e)
            entry["commit"] = self._parent_commit = result.commit
            shutil.rmtree(folder, ignore_errors=True)
        except Exception as e:  # tried again by wait(), on the training thread
            self._error, self._failed_step = e, step
            logger.warning("deltahub: uploading the version of step %s to %s failed (%s); trying again at the next version",
                           step, self.repo_id, str(e).splitlines()[0][:300])


def _check_tag_format(tag: str) -> None:
    """``tag`` must hold ``{step}`` and nothing else to format, and give a valid tag name."""
    import re

    try:
        sample = tag.format(step=123)
    except (IndexError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"tag {tag!r} must be a tag name with {{step}} in it, e.g. 'step-{{step}}' ({type(e).__name__}: {e})") from None
    if "{step}" not in tag or tag.format(step=124) == sample or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", sample):
        raise ValueError(f"tag {tag!r} must give one valid tag name per step (letters, digits, '.', '_', '-'; with {{step}}), e.g. 'step-{{step}}'")


def _remove_unless_kept(work: Path, failed: list, keep_folder: bool = False) -> None:
    """Empty the work folder but for the versions that failed to upload; remove it too when
    nothing is kept in it and it is deltahub's own (not a ``work_dir`` the user gave)."""
    kept = {Path(f["folder"]) for f in failed}
    if not work.is_dir():
        return
    for p in work.iterdir():
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    if not kept and not keep_folder:
        shutil.rmtree(work, ignore_errors=True)


def _unwrapped(model):
    """The model itself under DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _copies(ckpt) -> dict[str, torch.Tensor]:
    """New memory holding each tensor as it is now (the model trains on)."""
    out = {}
    for name in ckpt.names():
        with ckpt.borrow(name) as t:
            out[name] = t.clone()
    return out


def _decoded(folder: Path, base) -> dict[str, torch.Tensor]:
    """What the version in ``folder`` decodes to (a lossy keyframe), tensor by tensor."""
    from ..sources import decode_checked, open_pair

    reader, base_ckpt = open_pair(folder, base)
    return {n: decode_checked(reader, base_ckpt, n) for n, r in reader.records.items() if r["kind"] != "removed"}


def _message(state) -> str:
    """``step 500, epoch 1.25: loss 1.234, learning_rate 2e-05`` from the last logged metrics."""
    epoch = f", epoch {state.epoch:.2f}" if state.epoch is not None else ""
    # The last logged training metrics (the end-of-training summary, train_runtime and the like, is not one).
    logs = next((h for h in reversed(state.log_history) if "loss" in h), None)
    logs = logs or next((h for h in reversed(state.log_history) if any(k not in ("step", "epoch") for k in h)), {})
    metrics = ", ".join(f"{k} {_number(v)}" for k, v in logs.items() if k not in ("step", "epoch") and isinstance(v, (int, float)))
    return f"step {state.global_step}{epoch}" + (f": {metrics}" if metrics else "")


def _number(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)
