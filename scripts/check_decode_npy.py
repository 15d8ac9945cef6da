#!/usr/bin/env python3
"""Recomputes a decode saved by `flashinfer bench decode --save DIR` with NumPy (float64) and
prints the relative L2 error of the saved output, per request and overall.

    python3 scripts/check_decode_npy.py DIR
"""
import json
import sys
from pathlib import Path

import numpy as np


def main(d: Path) -> int:
    meta = json.loads((d / "meta.json").read_text())
    q = np.load(d / "q.npy").astype(np.float64)          # [batch, qo_heads, dim]
    k = np.load(d / "k_cache.npy").astype(np.float64)    # [pages, page, heads, dim] (nhd) or [pages, heads, page, dim]
    v = np.load(d / "v_cache.npy").astype(np.float64)
    out = np.load(d / "out.npy").astype(np.float64)
    indptr, indices, last = (np.load(d / f"{n}.npy") for n in ("kv_indptr", "kv_indices", "kv_last_page_len"))
    if meta["layout"] == "hnd":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    group = meta["num_qo_heads"] // meta["num_kv_heads"]
    page = meta["page_size"]
    num = den = 0.0
    worst = 0.0
    for b in range(q.shape[0]):
        pages = indices[indptr[b]:indptr[b + 1]]
        n = 0 if len(pages) == 0 else (len(pages) - 1) * page + int(last[b])
        kb = k[pages].reshape(-1, k.shape[2], k.shape[3])[:n]   # [tokens, kv_heads, dim]
        vb = v[pages].reshape(-1, v.shape[2], v.shape[3])[:n]
        ref = np.zeros_like(q[b])
        if n > 0:
            kh = np.repeat(kb, group, axis=1)                    # query head h -> kv head h // group
            vh = np.repeat(vb, group, axis=1)
            s = np.einsum("hd,thd->ht", q[b], kh) * meta["sm_scale"]
            p = np.exp(s - s.max(axis=1, keepdims=True))
            ref = np.einsum("ht,thd->hd", p / p.sum(axis=1, keepdims=True), vh)
        e = np.linalg.norm(out[b] - ref) / max(np.linalg.norm(ref), 1e-30)
        worst = max(worst, e if n > 0 else float(np.abs(out[b]).max()))
        num += np.sum((out[b] - ref) ** 2)
        den += np.sum(ref ** 2)
    print(f"{q.shape[0]} requests: relative L2 error {np.sqrt(num / den):.3e} overall, {worst:.3e} worst request")
    return 0 if np.sqrt(num / den) <= 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
