"""Compress past one machine: the per-tensor work of :func:`deltahub.compress` as Ray tasks
(``executor="ray"``, CLI ``--ray``).

The statistics pass of a planning method (``auto``) and the encode pass run one tensor per
task; a fused 3-D tensor of several experts (an MoE checkpoint's layout) is encoded by a task
per range of experts, and put together by one more. Each task opens the checkpoints where they are (the same folder on a shared disk, or the
Hub repo at the commit the driver resolved, downloaded into the worker's own Hugging Face
cache) and reads its two tensors from them: no weights travel from the driver. The driver
plans, collects the records in the checkpoint's order and writes the repo as a local run does,
byte for byte, when each task uses the local run's thread count (torch's reductions depend on
it; spec/FORMAT.md, "Determinism"). A tensor whose share of a whole-model ratio depends on
what the tensors before it took (a non-planning method at ``--ratio``) waits for them; planned
tensors (``auto``) and methods at their natural size run all at once.

Tasks that fail on input/output (a download, a read) are retried (``RETRIES``); a task whose
worker dies is retried by Ray; any other error stops the run with the task's own exception.
With ``device="cuda"`` each task asks Ray for one GPU (untested here: no GPU).

Ray is an optional extra (``pip install deltahub[ray]``): nothing here imports it until a Ray
executor is made, and ``deltahub`` must be installed on every node, since tasks run this module.

    deltahub compress BASE FT OUT --ray                    # a local cluster, or RAY_ADDRESS's
    deltahub.compress(base, ft, out, executor="ray", ray_address="ray://head:10001")
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .checkpoint import Checkpoint, DownloadError
from .errors import DeltahubError
from .planning import Executor, tensor_statistics

RETRIES = 3
# How often a driver thread waiting on a task looks at STOP (seconds).
POLL_SECONDS = 0.25
# Set to stop every Ray run of this process: each raises KeyboardInterrupt in its own thread at
# its next wait, so that its writer removes its partial output (compress_many on Ctrl-C/SIGTERM).
STOP = threading.Event()
# Errors worth another try on another worker: reads and downloads.
TRANSIENT: tuple[type[BaseException], ...] = (DownloadError, ConnectionError, TimeoutError)


class MissingDependencyError(DeltahubError, ImportError):
    """An optional dependency (Ray) that the call needs is not installed."""


@dataclass(frozen=True)
class CheckpointRef:
    """How a task opens a checkpoint the driver opened: the folder (same path on every node),
    or the Hub id at the commit the driver resolved (each worker's own cache)."""

    name_or_path: str
    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | None = None
    local_files_only: bool = False

    @classmethod
    def of(cls, ckpt: Checkpoint, hub: dict) -> "CheckpointRef":
        local = os.path.isdir(ckpt.source) and ckpt.revision is None
        return cls(
            str(ckpt.path) if local else ckpt.source, None if local else ckpt.revision, hub.get("token"),
            None if hub.get("cache_dir") is None else str(hub["cache_dir"]), bool(hub.get("local_files_only")),
        )

    def open(self) -> Checkpoint:
        """The checkpoint, opened once per worker process (its files stay mapped between tasks)."""
        if self not in _OPENED:
            _OPENED[self] = Checkpoint.open(self.name_or_path, revision=self.revision, token=self.token, cache_dir=self.cache_dir,
                                            local_files_only=self.local_files_only)
        return _OPENED[self]


_OPENED: dict[CheckpointRef, Checkpoint] = {}


@dataclass
class TensorTask:
    """What one tensor's encode needs besides the two tensors (:func:`deltahub.compress.tensor_job`)."""

    job: tuple
    seed: int
    fallback_dense: bool
    dense_instead: bool
    hessian: torch.Tensor | None = None


def encode_here(base: Checkpoint | None, finetuned: Checkpoint, name: str, task: TensorTask):
    """Encode tensor ``name`` from its checkpoints, with its digests: one task's work."""
    from .checkpoint import borrow_base
    from .compress import attempt, finish

    with finetuned.borrow(name) as ft, borrow_base(base, name) as b:
        return finish(attempt(name, b, ft, task.job, task.seed, task.fallback_dense, task.dense_instead, task.hessian), b, ft)


def _statistics_task(method, base: CheckpointRef, finetuned: CheckpointRef, name: str, hessian, threads: int):
    torch.set_num_threads(threads)
    return tensor_statistics(method, base.open(), finetuned.open(), name, hessian)


def _encode_task(base: CheckpointRef, finetuned: CheckpointRef, name: str, task: TensorTask, threads: int, device: str):
    from .methods.linalg import compute_device

    torch.set_num_threads(threads)
    with compute_device(device):
        return encode_here(base.open(), finetuned.open(), name, task)


def expert_ranges(shape: tuple, slots: int) -> list[tuple[int, int]]:
    """The expert ranges a fused 3-D tensor's encode is split into, one Ray task each: about two
    per task slot of the cluster (so that one tensor of many experts is not one long task), and
    no range of less than one expert."""
    count = min(shape[0], 2 * max(1, slots))
    bounds = [round(i * shape[0] / count) for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def _experts_task(base: CheckpointRef, finetuned: CheckpointRef, name: str, first: int, last: int, task: TensorTask, threads: int, device: str):
    from .encoding import encode_experts
    from .methods.linalg import compute_device

    torch.set_num_threads(threads)
    method, params, ratio, count_index = task.job
    with compute_device(device), finetuned.open().borrow(name) as ft, base.open().borrow(name) as b:
        try:
            return encode_experts(name, b[first:last], ft[first:last], tuple(ft.shape), first, method, ratio, seed=task.seed,
                                  count_index=count_index, **params)
        except DeltahubError as e:  # decided with the whole tensor in view (attempt_from_experts)
            return e


def _assemble_task(base: CheckpointRef, finetuned: CheckpointRef, name: str, task: TensorTask, threads: int, *parts):
    from .checkpoint import borrow_base
    from .compress import attempt_from_experts, finish

    torch.set_num_threads(threads)
    with finetuned.open().borrow(name) as ft, borrow_base(base.open(), name) as b:
        return finish(attempt_from_experts(name, b, ft, task.job, task.seed, task.fallback_dense, list(parts)), b, ft)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Ray connected (to ``address``, else ``RAY_ADDRESS``'s cluster, else a new local one: never
    one that ``ray start`` left running unless asked with ``auto``) for the block; a cluster
    started here is shut down after it."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("executor='ray' (--ray) needs Ray, which is not installed: pip install 'deltahub[ray]'") from None
    started = not ray.is_initialized()
    if address is not None or started:
        address = _checked_address(address if address is not None else os.environ.get("RAY_ADDRESS"))
    if started:
        with _signal_handlers_kept():
            # "local" when no address is given: without it Ray joins whatever cluster `ray start`
            # last left on this machine (/tmp/ray/ray_current_cluster), someone else's perhaps.
            ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        if started and ray.is_initialized():
            with _signal_handlers_kept():  # ray.shutdown resets SIGTERM to the default (die, no cleanup)
                ray.shutdown()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep this process's SIGTERM and SIGINT handlers across ``ray.init``, which installs a C++
    handler that aborts the process on SIGTERM (exit 134, no Python cleanup): with Python's
    handler back, SIGTERM ends the run as it does without Ray, partial output removed, and a
    cluster started here is shut down rather than left running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(s, handler)


def _checked_address(address: str | None, timeout: float = 10.0) -> str | None:
    """``address`` (``--ray-address`` or ``RAY_ADDRESS``) as Ray takes it, checked: ``None``,
    ``local``, ``auto``, ``ray://HOST:PORT``, or a ``HOST:PORT`` that answers (Ray itself
    retries an unanswered one for minutes). A typed error naming the address otherwise."""
    if address is None:
        return None
    shown = repr(address[:80])
    address = address.strip()
    where = "(--ray-address or RAY_ADDRESS)"
    if address.lower() in ("local", "auto"):
        return address.lower()
    if len(address) > 300:
        raise DeltahubError(f"Ray address {shown}... {where} is {len(address)} characters long; give HOST:PORT, auto, local, or ray://HOST:PORT")
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        raise DeltahubError(f"Ray address {shown} {where}: only ray:// addresses take a scheme; give HOST:PORT, auto, local, or ray://HOST:PORT")
    if sep:
        return address
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeltahubError(f"Ray address {shown} {where} must be HOST:PORT, auto, local, or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, UnicodeError) as e:
        raise DeltahubError(f"no Ray cluster answers at {address} {where}: {getattr(e, 'strerror', None) or e}; start one with "
                            "'ray start --head', or drop the address for a new local cluster") from None
    return address


class LocalEncoder(Executor):
    """One tensor after another in this process (what ``compress`` does without Ray)."""

    def encoded(self, base: Checkpoint, finetuned: Checkpoint, names: list[str], prepare: Callable[[str], TensorTask],
                dependent: Callable[[str], bool], device: str = "cpu") -> Iterator[Any]:
        for name in names:
            yield encode_here(base, finetuned, name, prepare(name))


class RayExecutor(LocalEncoder):
    """The per-tensor work as Ray tasks on the cluster at ``address`` (``None``: ``RAY_ADDRESS``,
    or a new local cluster), each task with ``threads`` torch threads (default: this process's)."""

    def __init__(self, base: Checkpoint, finetuned: Checkpoint, hub: dict, address: str | None = None, threads: int | None = None,
                 device: str = "cpu") -> None:
        self._session = ray_session(address)
        self.ray = ray = self._session.__enter__()
        if device.startswith("cuda") and not ray.cluster_resources().get("GPU"):
            # Ray would queue tasks that ask for a GPU forever, warning only in its logs.
            self.close()
            raise DeltahubError(f"device={device!r} (--device) asks each Ray task for a GPU, and the cluster has none; drop --device "
                                "cuda, or join a cluster with GPU nodes (--ray-address)")
        # A task asks for as many CPUs as it runs torch threads; more than the largest node has
        # would leave it queued forever, so the thread count is capped there (the bytes are then
        # those of a local run at that count: spec/FORMAT.md §13).
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
        self.threads = max(1, min(threads or torch.get_num_threads(), int(largest)))
        self.base, self.finetuned = CheckpointRef.of(base, hub), CheckpointRef.of(finetuned, hub)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Enough tasks in flight to keep every CPU busy, few enough that the driver holds little.
        self.window = max(2, 2 * cpus // self.threads)
        retry = dict(max_retries=RETRIES, retry_exceptions=list(TRANSIENT))
        self.slots = max(1, cpus // self.threads)
        self._stats = ray.remote(num_cpus=self.threads, **retry)(_statistics_task)
        self._encode = ray.remote(num_cpus=self.threads, **retry)(_encode_task)
        self._experts = ray.remote(num_cpus=self.threads, **retry)(_experts_task)
        self._assemble = ray.remote(num_cpus=self.threads, **retry)(_assemble_task)

    def close(self) -> None:
        self._session.__exit__(None, None, None)

    def _get(self, ref):
        try:
            while True:  # in short waits, so that STOP is seen (ray.get in a thread cannot be interrupted)
                try:
                    return self.ray.get(ref, timeout=POLL_SECONDS)
                except self.ray.exceptions.GetTimeoutError:
                    if STOP.is_set():
                        raise KeyboardInterrupt("stopped: another job of this run was interrupted") from None
        except SystemError as e:
            # A signal handler's exception (Ctrl-C, SIGTERM) raised inside ray.get's C code comes
            # out wrapped: the interrupt is what happened.
            inner = e.__cause__ or e.__context__
            if isinstance(inner, BaseException) and not isinstance(inner, Exception):
                raise inner from None
            raise
        except self.ray.exceptions.RayTaskError as e:
            # The task's own exception (a DeltahubError names file, field and fix), not Ray's wrapper.
            raise e.cause if e.cause is not None else e from None

    def statistics(self, method, base, finetuned, names, hessians) -> list:
        refs = [self._stats.remote(method, self.base, self.finetuned, n, hessians.get(n), self.threads) for n in names]
        try:
            return [self._get(r) for r in refs]
        except BaseException:
            self._cancel(refs)
            raise

    def _submit(self, finetuned: Checkpoint, name: str, task: TensorTask, options: dict, device: str):
        """One tensor's encode: one task, or, for a fused 3-D tensor of several experts, a task per
        range of experts and one that puts the record together (the same bytes)."""
        from .compress import splits_by_expert

        shape = tuple(finetuned.info(name).shape)
        if name not in self._base_names or not splits_by_expert(shape, task.job, task.dense_instead):
            return self._encode.options(**options).remote(self.base, self.finetuned, name, task, self.threads, device)
        parts = [self._experts.options(**options).remote(self.base, self.finetuned, name, a, b, task, self.threads, device)
                 for a, b in expert_ranges(shape, self.slots)]
        ref = self._assemble.remote(self.base, self.finetuned, name, task, self.threads, *parts)
        self._parts_of[ref] = parts  # held until the record is collected, to cancel them with it
        return ref

    def _collect(self, ref):
        try:
            return self._get(ref)
        finally:
            self._parts_of.pop(ref, None)

    def _cancel(self, refs) -> None:
        # Tasks nobody will collect (a failed or interrupted run) stop, on a cluster that outlives the run too.
        for ref in refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)

    def encoded(self, base, finetuned, names, prepare, dependent, device: str = "cpu") -> Iterator[Any]:
        options = {"num_gpus": 1} if device.startswith("cuda") else {}
        self._base_names = set(base.names())
        self._parts_of: dict = {}
        pending: deque = deque()
        try:
            for name in names:
                if dependent(name):  # its share depends on what every tensor before it took
                    while pending:
                        yield self._collect(pending.popleft())
                pending.append(self._submit(finetuned, name, prepare(name), options, device))
                while len(pending) > self.window:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            self._cancel([*pending, *(part for parts in self._parts_of.values() for part in parts)])
            self._parts_of.clear()
