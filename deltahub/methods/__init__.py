"""Compression methods: each a short recipe that produces components, found by name.

>>> from deltahub.methods import list_methods
>>> list_methods()
['auto', 'bitdelta', 'dare', 'deltacome', 'deltadq', 'dense', 'dqrelo', 'lossless', 'magnitude', 'svd']
"""

from . import auto, bitdelta, dare, deltacome, deltadq, dense, dqrelo, lossless, magnitude, svd  # noqa: F401  (registration)
from .base import METHODS, EncodeContext, Method, PlanEntry, Planned, get_method, list_methods, register_method

__all__ = ["METHODS", "EncodeContext", "Method", "PlanEntry", "Planned", "get_method", "list_methods", "register_method"]
