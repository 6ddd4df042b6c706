"""deltahub in other libraries' loops: :class:`DeltaCallback` versions a transformers (or TRL)
training run on the Hub as it trains."""

from .trainer import DeltaCallback, VersionError

__all__ = ["DeltaCallback", "VersionError"]
