"""Serving many fine-tunes on one base: unmerged deltas, hot swap, mixed-delta batches, LoRA export.

- ``operators``: one delta's change to one parameter, applied from its compressed components;
- ``layers``: module wrappers (Linear, Conv1D, Embedding, any other module) and row routing;
- ``model``: :class:`MultiDeltaModel`, the base of ``deltahub.DeltaModel`` (load, switch,
  disable, delete, merge);
- ``lora``: :func:`export_lora`, a delta as a PEFT LoRA adapter.
"""

from .errors import ServingError, UnknownDeltaError
from .lora import LoraExportReport, LoraModule, SkippedTensor, export_lora
from .model import PEFT_ALIASES, REFUSED, LoadedDelta, MultiDeltaModel, UnsupportedMethodError

__all__ = [
    "LoadedDelta", "LoraExportReport", "LoraModule", "MultiDeltaModel", "PEFT_ALIASES", "REFUSED", "ServingError", "SkippedTensor",
    "UnknownDeltaError", "UnsupportedMethodError", "export_lora",
]
