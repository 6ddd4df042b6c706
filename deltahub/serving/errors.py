"""Errors of the serving layer (unmerged deltas on one base, LoRA export)."""

from __future__ import annotations

from ..errors import DeltahubError


class ServingError(DeltahubError, ValueError):
    """A delta cannot be served unmerged as asked: a tensor the wrapped model has no module for,
    a batch whose rows do not match the delta names, a name already taken. The message says how
    to fix it (often: load the delta merged with ``DeltaModel.from_pretrained(delta)``)."""


class UnknownDeltaError(ServingError, KeyError):
    """No delta is loaded under the given name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
