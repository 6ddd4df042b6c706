"""deltahub's progress bars, and silence for the bars of the libraries it calls.

deltahub's own bars are ``huggingface_hub.utils.tqdm`` bars of the group ``"deltahub"``, so they
honour ``HF_HUB_DISABLE_PROGRESS_BARS=1`` and ``huggingface_hub.utils.disable_progress_bars()``
(globally or for ``"deltahub"``). Inside them, the bars that transformers and huggingface_hub
draw for their own work ("Loading weights" of every model load, "Fetching N files" of every
Hub snapshot, even from the cache) are silenced: :func:`progress` holds :func:`quiet_third_party`
until the bar is closed, so one deltahub command shows deltahub's bars only.
"""

from __future__ import annotations

import importlib
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from huggingface_hub.utils import tqdm as hf_tqdm

GROUP = "deltahub"  # the huggingface_hub progress-bar group of deltahub's own bars

_lock = threading.Lock()
_depth = 0
_saved: tuple[dict[str, bool], bool] | None = None


def _hf_module():
    # The module, not the class that huggingface_hub.utils exports under the same name.
    return importlib.import_module("huggingface_hub.utils.tqdm")


def _hf_states() -> dict[str, bool]:
    # huggingface_hub keeps the global and per-group switches in this module-level dict; a copy
    # of it is the only way to restore exactly what a caller had set (enable/disable_progress_bars
    # reset every subgroup).
    return _hf_module().progress_bar_states


def _env_setting() -> bool | None:
    """``HF_HUB_DISABLE_PROGRESS_BARS`` as huggingface_hub read it: True, False (forced on) or None."""
    return getattr(_hf_module(), "HF_HUB_DISABLE_PROGRESS_BARS", None)


def _transformers_logging():
    """transformers' logging module if transformers is already imported, else None: importing it
    only to silence it would cost commands that never load a model (info, log) half a second."""
    import sys

    return sys.modules.get("transformers.utils.logging")


def _silence() -> tuple[dict[str, bool], bool | None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tf_logging = _transformers_logging()
    saved = (dict(_hf_states()), tf_logging.is_progress_bar_enabled() if tf_logging else None)
    ours_off = are_progress_bars_disabled(GROUP)
    # transformers imported later in the block reads its switch from huggingface_hub's global
    # one at import time, so that one is turned off too.
    disable_progress_bars()
    if tf_logging:
        tf_logging.disable_progress_bar()
    if not ours_off:
        enable_progress_bars(GROUP)  # deltahub's bars stay as the caller had them
    return saved


def _restore(saved: tuple[dict[str, bool], bool | None]) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    states, transformers_on = saved
    current = _hf_states()
    current.clear()
    current.update(states)
    tf_logging = _transformers_logging()
    if tf_logging:
        # Imported inside the block, transformers took the silenced state: give it the one it
        # would have taken outside.
        on = transformers_on if transformers_on is not None else not are_progress_bars_disabled()
        # transformers' switches also set huggingface_hub's global one: restore that after them.
        tf_logging.enable_progress_bar() if on else tf_logging.disable_progress_bar()
        current.clear()
        current.update(states)


@contextmanager
def quiet_third_party() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars for the block; deltahub's stay.

    Reentrant and safe to nest (the state before the outermost entry is restored when the last
    one exits). A no-op where ``HF_HUB_DISABLE_PROGRESS_BARS`` is set: ``1`` silences every bar
    already, ``0`` asks for every bar.
    """
    global _depth, _saved
    if _env_setting() is not None:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = _silence()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                _restore(_saved)
                _saved = None


class _Bar(hf_tqdm):
    """A huggingface_hub tqdm of the deltahub group that silences third-party bars while open."""

    def __init__(self, *args, **kwargs):
        self._quiet = quiet_third_party()
        self._quiet.__enter__()
        try:
            super().__init__(*args, name=GROUP, **kwargs)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        quiet, self._quiet = getattr(self, "_quiet", None), None
        if quiet is not None:
            quiet.__exit__(None, None, None)

    def __iter__(self):
        # tqdm does not close a disabled bar at the end of its iteration: release here as well.
        try:
            yield from super().__iter__()
        finally:
            self.close()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None, enabled: bool = True, **kwargs) -> hf_tqdm:
    """A deltahub progress bar (``huggingface_hub.utils.tqdm``; extra keywords go to tqdm).

    Hidden when ``enabled`` is false, when ``HF_HUB_DISABLE_PROGRESS_BARS=1``, or after
    ``huggingface_hub.utils.disable_progress_bars()`` (or ``disable_progress_bars("deltahub")``).
    Until it is closed (a ``with`` block, the end of the iteration, or ``close()``), the bars of
    transformers and huggingface_hub are silenced (:func:`quiet_third_party`), even when this bar
    itself is hidden: a deltahub call with ``progress=False`` draws no bar at all.
    """
    return _Bar(iterable, total=total, desc=desc, disable=not enabled, **kwargs)
