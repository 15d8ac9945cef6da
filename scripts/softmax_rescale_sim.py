#!/usr/bin/env python3
"""How often the prefill kernel's online softmax rescales O, simulated on the CPU for the inputs
`flashinfer bench prefill` uses (q and k uniform in [-1, 1), head_dim 128, 32 query / 8 KV heads,
1 x 8192 causal, ALiBi's standard slopes): a warp's 16 packed rows (4 tokens x 4 heads) rescale on
a 128-key tile when some row's max grows (kernels/prefill.cuh). Counts the tiles after the first,
in key order and diagonal first (PREFILL_REVERSE_KV). Needs numpy.
"""
import numpy as np

rng = np.random.default_rng(0)
D, H, G, KT = 128, 32, 4, 128
slopes = 2.0 ** (-8.0 * (np.arange(H) + 1) / H)


def rate(kv_head, tok0, alibi, reverse):
    toks = tok0 + np.arange(4)
    heads = kv_head * G + np.arange(G)
    q = rng.uniform(-1, 1, (4, G, D)).astype(np.float32)
    n = toks[-1] + 1
    k = rng.uniform(-1, 1, (n, D)).astype(np.float32)
    s = np.einsum("tgd,kd->tgk", q, k) / np.sqrt(D)
    keys = np.arange(n)
    if alibi:
        s = s + slopes[heads][None, :, None] * (keys[None, None, :] - toks[:, None, None])
    s = np.where(keys[None, None, :] <= toks[:, None, None], s, -np.inf).reshape(16, n)
    tiles = (n + KT - 1) // KT
    order = range(tiles - 1, -1, -1) if reverse else range(tiles)
    m = np.full(16, -np.inf)
    moved = 0
    for i, t in enumerate(order):
        new = np.maximum(m, s[:, t * KT:(t + 1) * KT].max(axis=1))
        moved += i > 0 and bool(np.any(new > m))
        m = new
    return moved / max(1, tiles - 1)


for alibi in (False, True):
    for reverse in (False, True):
        r = [rate(h, t, alibi, reverse) for h in (0, 3, 7) for t in (1024, 4096, 8188)]
        print(f"alibi={alibi!s:5} diagonal first={reverse!s:5}: O rescaled on {np.mean(r):.0%} of tiles")
