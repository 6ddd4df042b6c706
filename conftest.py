"""Loaded by pytest before anything else: point huggingface_hub at the local Hub test double.

huggingface_hub reads HF_ENDPOINT and friends when it is first imported, so they are set here,
before any test module (or doctest of deltahub) imports it. The server itself starts only for
tests that ask for the ``hub`` fixture (tests/conftest.py), on the port reserved here. The
tests never reach the real Hub, and use a throwaway Hugging Face cache.
"""

from __future__ import annotations

import os
import socket
import tempfile

with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as _s:
    _s.bind(("127.0.0.1", 0))
    HUB_PORT = _s.getsockname()[1]

os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="deltahub-tests-hf-home-")
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)
