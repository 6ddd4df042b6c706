"""Typed errors. Every error deltahub raises for bad input is a :class:`DeltahubError`.

Each message names the tensor or file involved and says how to fix the problem.
Catch the specific class when you want to handle one case, or ``DeltahubError`` for all.
"""

from __future__ import annotations


class DeltahubError(Exception):
    """Base class of every error deltahub raises on purpose."""


class FormatError(DeltahubError, ValueError):
    """A delta file is malformed: truncated, corrupted, or not what its config declares."""


class UnsupportedFormatVersionError(FormatError):
    """The delta was written with a format major version this deltahub cannot read."""


class UnknownComponentError(FormatError):
    """A record names a component type this version of the format does not define."""


class UnknownMethodError(DeltahubError, KeyError):
    """No compression method is registered under the given name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class UnknownParameterError(DeltahubError, TypeError, ValueError):
    """A method was given a parameter it does not take (a TypeError, as a Python call would raise)."""


class InvalidParameterError(DeltahubError, ValueError):
    """A method was given a parameter value it cannot take (out of range, or of the wrong type)."""


class InfeasibleRatioError(DeltahubError, ValueError):
    """The requested ratio cannot be met by the method on this tensor."""


class InvalidTensorError(DeltahubError, ValueError):
    """A weight holds NaN or Inf, or has a shape or dtype the operation cannot accept."""


class ShapeMismatchError(InvalidTensorError):
    """Base and fine-tuned tensors have shapes that cannot be paired."""


class BaseMismatchError(DeltahubError, ValueError):
    """The base model given does not match the base the delta was made against."""


class OutputError(DeltahubError, ValueError):
    """The output folder is, contains or lies inside an input (or a Hugging Face cache repo):
    writing there could delete or change the input."""
