"""The random streams the format needs at read time, fixed bit for bit (spec/FORMAT.md, "Random masks").

SplitMix64 (Steele, Lea and Flood, 2014) keyed by a 64-bit seed: element ``t`` of a block
(row-major, starting at 0) gets ``key(t) = mix64(seed + (t + 1) * GAMMA mod 2**64) >> 11``,
a 53-bit integer. Nothing here depends on numpy's or torch's own generators.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

GAMMA = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
KEY_BITS = 53

# Keys are made a chunk at a time: at 64K elements the uint64 temporaries stay in cache, which
# makes a mask about 10x faster than 4M-element chunks (benchmarks/README.md, auto decode).
_CHUNK_ELEMS = 1 << 16


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 values (wrapping arithmetic)."""
    z = z.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


def keys(seed: int, start: int, count: int) -> np.ndarray:
    """53-bit keys of elements ``start .. start+count-1`` as uint64."""
    out = np.empty(count, dtype=np.uint64)
    for s in range(0, count, _CHUNK_ELEMS):
        c = min(_CHUNK_ELEMS, count - s)
        t = np.arange(start + s + 1, start + s + c + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            state = np.uint64(seed) + t * np.uint64(GAMMA)
        out[s : s + c] = mix64(state) >> np.uint64(64 - KEY_BITS)
    return out


def tensor_seed(global_seed: int, name: str) -> int:
    """The per-tensor seed deltahub writes: first 8 bytes (little-endian) of SHA-256("{seed}:{name}")."""
    digest = hashlib.sha256(f"{global_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def group_keep_count(length: int, group_size: int, keep: int) -> int:
    """Elements kept in a group of ``length`` (``keep`` for a full group, floor-prorated for the short last one)."""
    return keep if length == group_size else (length * keep) // group_size


def group_mask(seed: int, rows: int, cols: int, group_size: int, keep: int) -> torch.Tensor:
    """Bool mask [rows, cols]: in each run of ``group_size`` columns keep the ``keep`` smallest keys.

    Ties (impossible in practice) go to the lower column. The last, shorter group of a row keeps
    ``floor(length * keep / group_size)``.
    """
    if not 0 <= keep <= group_size:
        raise ValueError(f"keep must be in 0..group_size, got keep={keep}, group_size={group_size}")
    mask = np.zeros((rows, cols), dtype=bool)
    full = cols // group_size
    tail = cols - full * group_size
    tail_keep = group_keep_count(tail, group_size, keep) if tail else 0
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        k = keys(seed, r0 * cols, (r1 - r0) * cols).reshape(r1 - r0, cols)
        if full and keep:
            g = k[:, : full * group_size].reshape(r1 - r0, full, group_size)
            order = np.argsort(g, axis=2, kind="stable")[:, :, :keep]
            sub = np.zeros(g.shape, dtype=bool)
            np.put_along_axis(sub, order, True, axis=2)
            mask[r0:r1, : full * group_size] = sub.reshape(r1 - r0, full * group_size)
        if tail and tail_keep:
            t = k[:, full * group_size :]
            order = np.argsort(t, axis=1, kind="stable")[:, :tail_keep]
            sub = np.zeros(t.shape, dtype=bool)
            np.put_along_axis(sub, order, True, axis=1)
            mask[r0:r1, full * group_size :] = sub
    return torch.from_numpy(mask)


def bernoulli_mask(seed: int, rows: int, cols: int, threshold: int) -> torch.Tensor:
    """Bool mask [rows, cols]: keep element ``t`` iff ``key(t) < threshold`` (threshold in 0..2**53)."""
    n = rows * cols
    out = np.empty(n, dtype=bool)
    for s in range(0, n, _CHUNK_ELEMS):
        c = min(_CHUNK_ELEMS, n - s)
        out[s : s + c] = keys(seed, s, c) < np.uint64(threshold)
    return torch.from_numpy(out.reshape(rows, cols))


def bernoulli_threshold(seed: int, count: int, keep: int) -> int:
    """The threshold that keeps exactly ``keep`` of ``count`` elements: the ``keep+1``-th smallest
    key (``2**53`` to keep them all), found without holding every key.

    >>> t = bernoulli_threshold(7, 10_000, 1_234)
    >>> int(bernoulli_mask(7, 100, 100, t).sum())
    1234
    """
    full = 1 << KEY_BITS
    if keep >= count:
        return full
    # Keys are uniform, so the answer lies within a few standard deviations of keep/count of the
    # range: count the keys below a window around it and sort only those inside.
    margin = 8 * math.sqrt(keep * (1 - keep / count)) + 64
    lo = max(0, int((keep - margin) / count * full))
    hi = min(full, int((keep + margin) / count * full) + 1)
    below, inside = 0, []
    for s in range(0, count, _CHUNK_ELEMS):
        k = keys(seed, s, min(_CHUNK_ELEMS, count - s))
        below += int(np.count_nonzero(k < np.uint64(lo)))
        inside.append(k[(k >= np.uint64(lo)) & (k < np.uint64(hi))])
    window = np.sort(np.concatenate(inside))
    if below <= keep < below + window.size:
        return int(window[keep - below])
    return int(np.partition(keys(seed, 0, count), keep)[keep])  # beyond eight standard deviations


def keep_probability_threshold(p_keep: float) -> int:
    """The integer threshold that keeps each element with probability ``p_keep``."""
    return int(round(p_keep * (1 << KEY_BITS)))
