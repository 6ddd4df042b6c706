"""The on-disk format v1: components, records, ``delta_config.json`` and the repo reader/writer.

spec/FORMAT.md is the normative description; this package is deltahub's implementation of it.
"""

from .config import CONFIG_NAME, FINETUNED_CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, check_version, fingerprint
from .records import KINDS, decode_record, make_record, record_nbytes, validate_record
from .repo import DeltaReader, DeltaWriter

__all__ = [
    "CONFIG_NAME", "FINETUNED_CONFIG_NAME", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_NAME", "KINDS",
    "DeltaReader", "DeltaWriter", "check_version", "decode_record", "fingerprint", "make_record", "record_nbytes", "validate_record",
]
