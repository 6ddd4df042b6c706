"""deltahub: store, share, version and load fine-tuned models as compressed deltas against their base.

>>> import torch, deltahub
>>> base = torch.zeros(128, 128, dtype=torch.bfloat16)
>>> ft = (torch.randn(128, 128) * 1e-2).bfloat16()
>>> enc = deltahub.encode_tensor("w", base, ft, method="dqrelo", ratio=1/4)
>>> torch.allclose(enc.decode(base).float(), ft.float(), atol=0.05)
True
"""

from .apply import apply
from .base_id import BaseIdError, BaseIdNotCheckedWarning, set_base_id
from .checkpoint import Checkpoint, CheckpointError, DownloadError
from .compress import CompressResult, compress
from .encoding import EncodedTensor, decode_tensor, encode_tensor
from .errors import (
    BaseMismatchError,
    DeltahubError,
    FormatError,
    InfeasibleRatioError,
    InvalidParameterError,
    InvalidTensorError,
    OutputError,
    ShapeMismatchError,
    UnknownComponentError,
    UnknownMethodError,
    UnsupportedFormatVersionError,
)
from .format import FORMAT_VERSION, DeltaReader, DeltaWriter
from .evaluate import EvalReport, evaluate
from .diff import DiffError, DiffReport, diff
from .hub import ConcurrentPushError, History, HubError, LocalBaseError, PushResult, UntaggedPushError, Version, history, pull, push, rollback
from .jobs import Job, JobFileError, JobOutcome, compress_many, read_jobs
from .inspect import DeltaInfo, VerifyReport, info, verify
from .methods import get_method, list_methods
from .model import DeltaModel
from .policy import Policy, Rule
from .serving import LoraExportReport, ServingError, UnknownDeltaError, UnsupportedMethodError, export_lora
from .version import __version__

__all__ = [
    "FORMAT_VERSION", "BaseMismatchError", "Checkpoint", "CheckpointError", "CompressResult", "DeltaInfo", "DeltaModel",
    "DeltaReader", "DeltaWriter", "DeltahubError", "EncodedTensor", "FormatError", "InfeasibleRatioError", "InvalidParameterError", "InvalidTensorError",
    "OutputError", "Policy", "Rule", "ShapeMismatchError", "UnknownComponentError", "UnknownMethodError", "UnsupportedFormatVersionError",
    "VerifyReport", "__version__", "apply", "compress", "decode_tensor", "encode_tensor", "get_method", "info", "list_methods", "verify",
    "EvalReport", "evaluate", "ConcurrentPushError", "UntaggedPushError", "LocalBaseError", "BaseIdError", "BaseIdNotCheckedWarning", "set_base_id", "History", "HubError", "PushResult", "Version", "history", "pull", "push", "rollback",
    "LoraExportReport", "ServingError", "UnsupportedMethodError", "UnknownDeltaError", "export_lora",
    "DiffError", "DiffReport", "diff",
    "DownloadError", "Job", "JobFileError", "JobOutcome", "compress_many", "read_jobs",
]
