"""Errors of the serving layer (unmerged deltas on one base, LoRA export)."""

from __future__ import annotations

from ..errors import DeltahubError


def refuse_chain(reader, what: str) -> None:
    """:class:`ServingError` for a version stored against its parent: its records are deltas
    from the parent's weights, not from the base's, so unmerged serving and LoRA export (which
    add the delta to the base's weights) would build another model."""
    if reader.config.get("parent") is not None:
        src = getattr(reader, "source", reader.path)
        raise ServingError(
            f"{src}: this version is stored against its parent version (spec §4.4), not against the base, so it cannot be {what}; "
            "load it merged (DeltaModel.from_pretrained(delta)) or `deltahub apply` it, or compress the fine-tune against the base"
        )


class ServingError(DeltahubError, ValueError):
    """A delta cannot be served unmerged as asked: a tensor the wrapped model has no module for,
    a batch whose rows do not match the delta names, a name already taken. The message says how
    to fix it (often: load the delta merged with ``DeltaModel.from_pretrained(delta)``)."""


class UnknownDeltaError(ServingError, KeyError):
    """No delta is loaded under the given name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""
