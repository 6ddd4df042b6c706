"""Truncated SVD in float32, full by default, randomized on request."""

from __future__ import annotations

import torch


def truncated_svd(x: torch.Tensor, rank: int, *, randomized: bool = False, oversample: int = 16, niter: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U [p, r], S [r], V [q, r]`` of the best rank-``r`` approximation of ``x`` (float32).

    The randomized variant (Halko et al., 2011) uses ``rank + oversample`` probe vectors and
    ``niter`` power iterations, seeded so repeated runs give identical bytes.
    """
    x = x.to(torch.float32)
    if randomized and rank + oversample < min(x.shape):
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
            u, s, v = torch.svd_lowrank(x, q=rank + oversample, niter=niter)
        finally:
            torch.random.set_rng_state(gen_state)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), v[:, :rank].contiguous()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].t().contiguous()


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.to(torch.float32))
