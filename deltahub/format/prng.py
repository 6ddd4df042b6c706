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
KEY_BITS = 53


def _signed(x: int) -> int:
    """The int64 with the bits of the uint64 ``x``."""
    return x - (1 << 64) if x >= 1 << 63 else x


# On CPUs the keys are computed with numpy's uint64, a chunk at a time in place: logical shifts
# and wrapping arithmetic are native there, and at 64K elements the two buffers stay in cache:
# 3-4 ns a key on one core, about twice as fast as torch's int64 path (benchmarks/README.md, load).
_CHUNK_ELEMS = 1 << 16
_STEPS_U64 = np.arange(1, _CHUNK_ELEMS + 1, dtype=np.uint64) * np.uint64(GAMMA)  # (t + 1) * GAMMA
_M1_U64, _M2_U64 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

# On other devices (GPUs) on torch int64 tensors: two's-complement multiplication and addition
# wrap exactly as unsigned arithmetic modulo 2**64 does, and masking after each arithmetic shift
# makes it a logical one.
_GAMMA = _signed(GAMMA)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _mix_into_numpy(z: np.ndarray, t: np.ndarray, seed: int, start: int) -> None:
    """SplitMix64's 64-bit outputs for elements ``start ..`` into the uint64 array ``z`` (at most
    one chunk long; ``t`` is scratch of the same size). A key is this ``>> (64 - KEY_BITS)``."""
    n = z.size
    np.add(_STEPS_U64[:n], np.uint64((seed + start * GAMMA) % (1 << 64)), out=z)
    for shift, mul in ((30, _M1_U64), (27, _M2_U64), (31, None)):
        np.right_shift(z, np.uint64(shift), out=t)
        np.bitwise_xor(z, t, out=z)
        if mul is not None:
            np.multiply(z, mul, out=z)


def _keys_into_numpy(out: np.ndarray, seed: int, start: int) -> None:
    """Keys of elements ``start ..`` into the uint64 array ``out`` (at most one chunk long)."""
    z, t = np.empty(out.size, dtype=np.uint64), np.empty(out.size, dtype=np.uint64)
    _mix_into_numpy(z, t, seed, start)
    np.right_shift(z, np.uint64(64 - KEY_BITS), out=out)


def _xorshift_(z: torch.Tensor, shift: int) -> torch.Tensor:
    """``z ^= z >> shift`` with a logical shift, in place."""
    return z.bitwise_xor_(z.bitwise_right_shift(shift).bitwise_and_((1 << (64 - shift)) - 1))


def _keys_torch(seed: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Keys on any torch device, all at once."""
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_GAMMA).add_(_signed((seed + start * GAMMA) % (1 << 64)))
    _xorshift_(z, 30).mul_(_M1)
    _xorshift_(z, 27).mul_(_M2)
    _xorshift_(z, 31)
    return z.bitwise_right_shift_(64 - KEY_BITS).bitwise_and_((1 << KEY_BITS) - 1)


def keys(seed: int, start: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """53-bit keys of elements ``start .. start+count-1``, as int64 (on ``device``, default CPU).

    >>> keys(0, 0, 3).tolist()
    [7956156453446585, 3886858653415212, 238094247788840]
    """
    if device is not None and torch.device(device).type != "cpu":
        return _keys_torch(seed, start, count, device)
    out = np.empty(count, dtype=np.uint64)
    for s in range(0, count, _CHUNK_ELEMS):
        _keys_into_numpy(out[s : s + _CHUNK_ELEMS], seed, start + s)
    return torch.from_numpy(out.view(np.int64))  # keys are below 2**53: the same values


def tensor_seed(global_seed: int, name: str) -> int:
    """The per-tensor seed deltahub writes: first 8 bytes (little-endian) of SHA-256("{seed}:{name}")."""
    digest = hashlib.sha256(f"{global_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def group_keep_count(length: int, group_size: int, keep: int) -> int:
    """Elements kept in a group of ``length`` (``keep`` for a full group, floor-prorated for the short last one)."""
    return keep if length == group_size else (length * keep) // group_size


def group_mask(seed: int, rows: int, cols: int, group_size: int, keep: int, row0: int = 0) -> torch.Tensor:
    """Bool mask [rows, cols]: in each run of ``group_size`` columns keep the ``keep`` smallest keys.

    Ties (impossible in practice) go to the lower column. The last, shorter group of a row keeps
    ``floor(length * keep / group_size)``. ``row0``: the mask's rows are rows ``row0 ..`` of the
    matrix view.
    """
    if not 0 <= keep <= group_size:
        raise ValueError(f"keep must be in 0..group_size, got keep={keep}, group_size={group_size}")
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    full = cols // group_size
    tail = cols - full * group_size
    tail_keep = group_keep_count(tail, group_size, keep) if tail else 0
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        k = keys(seed, (row0 + r0) * cols, (r1 - r0) * cols).view(r1 - r0, cols)
        if full and keep:
            g = k[:, : full * group_size].reshape(r1 - r0, full, group_size)
            order = torch.sort(g, dim=2, stable=True).indices[:, :, :keep]
            mask[r0:r1, : full * group_size].view(r1 - r0, full, group_size).scatter_(2, order, True)
        if tail and tail_keep:
            order = torch.sort(k[:, full * group_size :], dim=1, stable=True).indices[:, :tail_keep]
            mask[r0:r1, full * group_size :].scatter_(1, order, True)
    return mask


def bernoulli_keep(seed: int, start: int, count: int, threshold: int) -> np.ndarray:
    """Bool [count]: ``key(t) < threshold`` for elements ``start .. start+count-1`` (threshold in 0..2**53).

    Tested on the 64-bit output before the shift: ``mix >> 11 < threshold`` exactly when
    ``mix < threshold * 2**11``, which saves a pass over the keys.

    >>> bernoulli_keep(0, 0, 3, 4_000_000_000_000_000).tolist()
    [False, True, True]
    """
    out = np.empty(count, dtype=np.bool_)
    if threshold >= 1 << KEY_BITS:
        out[:] = True
        return out
    limit = np.uint64(threshold << (64 - KEY_BITS))
    z, t = np.empty(min(count, _CHUNK_ELEMS), dtype=np.uint64), np.empty(min(count, _CHUNK_ELEMS), dtype=np.uint64)
    for s in range(0, count, _CHUNK_ELEMS):
        n = min(_CHUNK_ELEMS, count - s)
        _mix_into_numpy(z[:n], t[:n], seed, start + s)
        np.less(z[:n], limit, out=out[s : s + n])
    return out


def bernoulli_mask(seed: int, rows: int, cols: int, threshold: int) -> torch.Tensor:
    """Bool mask [rows, cols]: keep element ``t`` iff ``key(t) < threshold`` (threshold in 0..2**53)."""
    return torch.from_numpy(bernoulli_keep(seed, 0, rows * cols, threshold)).view(rows, cols)


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
        below += int(torch.count_nonzero(k < lo))
        inside.append(k[(k >= lo) & (k < hi)])
    window = torch.sort(torch.cat(inside)).values
    if below <= keep < below + window.numel():
        return int(window[keep - below])
    return int(torch.kthvalue(keys(seed, 0, count), keep + 1).values)  # beyond eight standard deviations


def keep_probability_threshold(p_keep: float) -> int:
    """The integer threshold that keeps each element with probability ``p_keep``."""
    return int(round(p_keep * (1 << KEY_BITS)))
