#!/usr/bin/env python3
"""FlashInfer 0.6.13's batch decode (paged, tensor cores) timed the way `flashinfer bench decode`
times ours, for side-by-side numbers: bf16, NHD, page ids shuffled, CUDA events, median of 50
runs after 5 warm-ups, L2 kept cold by either a 256 MB write before each run (`--flush write`) or
by rotating over copies of the KV pool of 256 MB or more in all, each timed run after an untimed
one on another copy (`--flush rotate`).

On the GPU host (see ../shared/gpu/README.md for installing the wheels):
    python3 scripts/flashinfer_decode_compare.py --batch 64 --kv-len 4096 --flush write
    python3 scripts/flashinfer_decode_compare.py --lens-file docs/lens/one_32768_63x256.txt
Prints one JSON line per run.
"""
import argparse
import json

import torch
import flashinfer

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=64)
p.add_argument("--kv-len", type=int, default=4096)
p.add_argument("--lens-file")
p.add_argument("--page-size", type=int, default=16)
p.add_argument("--heads", default="32:8")
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--flush", choices=["write", "rotate"], default="write")
p.add_argument("--runs", type=int, default=50)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--seed", type=int, default=42)
a = p.parse_args()

hq, hk = (int(x) for x in a.heads.split(":"))
d, ps = a.head_dim, a.page_size
if a.lens_file:
    lens = [int(x) for x in open(a.lens_file).read().split()]
else:
    lens = [a.kv_len] * a.batch
gen = torch.Generator(device="cpu").manual_seed(a.seed)
pages_per = [(n + ps - 1) // ps for n in lens]
num_pages = sum(pages_per)
ids = torch.randperm(num_pages, generator=gen).to(torch.int32)
indptr = torch.tensor([0] + list(torch.tensor(pages_per).cumsum(0)), dtype=torch.int32)
last = torch.tensor([(n - 1) % ps + 1 if n > 0 else 0 for n in lens], dtype=torch.int32)
dev = "cuda"
shape = (num_pages, ps, hk, d)
k = torch.randn(shape, generator=gen).to(dev, torch.bfloat16)
v = torch.randn(shape, generator=gen).to(dev, torch.bfloat16)
q = torch.randn((len(lens), hq, d), generator=gen).to(dev, torch.bfloat16)

ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
w.plan(indptr.to(dev), ids.to(dev), last.to(dev), hq, hk, d, ps, q_data_type=torch.bfloat16,
       kv_data_type=torch.bfloat16)

pools = [(k, v)]
if a.flush == "rotate":
    pool_bytes = 2 * k.numel() * 2
    for _ in range(1, max(2, -(-(256 << 20) // pool_bytes))):
        pools.append((k.clone(), v.clone()))
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

# Check against a float reference of the first request before timing.
out = w.run(q, pools[0])
n0 = lens[0]
if n0 > 0:
    rows = torch.cat([ids[indptr[0]:indptr[1]].long()])
    kk = k[rows.to(dev)].reshape(-1, hk, d)[:n0].float()
    vv = v[rows.to(dev)].reshape(-1, hk, d)[:n0].float()
    g = hq // hk
    qq = q[0].float().reshape(hk, g, d)
    s = torch.einsum("hgd,nhd->hgn", qq, kk) / d ** 0.5
    ref = torch.einsum("hgn,nhd->hgd", s.softmax(-1), vv).reshape(hq, d)
    err = ((out[0].float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"FlashInfer result check failed: rel L2 {err}"

times = []
for i in range(a.warmup + a.runs):
    kv = pools[(2 * i + 1) % len(pools)]
    if a.flush == "write":
        flush.zero_()
    else:
        # An untimed run on another copy keeps the GPU busy while the timed one is enqueued (as
        # the flush does); otherwise the host's launch time would be timed too.
        w.run(q, pools[(2 * i) % len(pools)], out=out)
    s0 = torch.cuda.Event(enable_timing=True)
    s1 = torch.cuda.Event(enable_timing=True)
    s0.record()
    w.run(q, kv, out=out)
    s1.record()
    torch.cuda.synchronize()
    if i >= a.warmup:
        times.append(s0.elapsed_time(s1) * 1e3)
times.sort()
med = times[len(times) // 2]
kv_bytes = sum(lens) * hk * d * 2 * 2
print(json.dumps({"impl": "flashinfer-0.6.13-tc", "batch": len(lens), "total_kv": sum(lens),
                  "flush": a.flush, "pools": len(pools), "median_us": round(med, 2),
                  "tb_per_s": round((kv_bytes + 2 * q.numel() * 2 + num_pages * 4) / med / 1e6, 3)}))
