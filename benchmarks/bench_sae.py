#!/usr/bin/env python
"""SAE training benchmark: our training step vs a plain PyTorch reference, L_N's cost, cache reads.

    .venv/bin/python benchmarks/bench_sae.py [--quick] [--d-in 3072] [--expansion 4] [--batch 4096]
                                             [--steps 3] [--l0 64] [--device cpu|cuda] [--out-json PATH]

All ratios are against references measured in the same run, interleaved step by step (reference,
ours, ours + L_N, then the reverse order, ...) so machine noise hits all alike; per-step medians.

1. Training throughput (activations/s): `neuron_embeddings.core.sae.train_step` (standard SAE, L1) vs a
   plain PyTorch reference of the same SAE written below (same maths: ReLU encoder on x - b_dec,
   MSE + L1, W_dec's parallel gradient removed, Adam, rows renormalised). Target ours/ref >= 1.0.
2. A step with L_N (lookup warmed up, every active pair counted) vs a standard step. Target <= 1.5.
   All three start from the same weights with b_enc set so each feature fires on l0/d_sae of the
   tokens (about `--l0` active features per token, a trained SAE's sparsity; at random init about
   half the features fire and L_N's backward falls back to dense products).
3. Cached-activation reads: a float16 cache of synthetic activations written with the real
   CacheWriter, read back by `ShuffledBatches.stream()` (shuffled, prefetched); rows/s vs the
   training step's appetite (item 1's activations/s). Also a real `train_sae` run fed from that
   reader, with the time the loop spent waiting for batches.

GPT-2-small-like defaults: d_in 3072 (an MLP layer), expansion 4 (12,288 features), batch 4096.
`--quick`: d_in 512, batch 1024 (a smoke test, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from neuron_embeddings.core import sae as S

# --- the reference: plain PyTorch, the same SAE -----------------------------------------------

class ReferenceSAE:
    """The textbook SAE step, written directly with tensors and torch.optim.Adam."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, lr: float, l1: float):
        self.params = [t.detach().clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.l1 = l1

    def step(self, x):
        W_enc, b_enc, W_dec, b_dec = self.params
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean() + self.l1 * f.sum(-1).mean()
        self.opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            g = W_dec.grad
            g -= (g * W_dec).sum(-1, keepdim=True) * W_dec
        self.opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
        return loss.detach()


def synthetic_activations(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    """GELU-like non-negative activations with low-rank structure (values matter little for timing)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g) / 8
    codes = torch.randn(n, 64, generator=g).relu()
    return torch.nn.functional.gelu(codes @ basis + 0.3 * torch.randn(n, d, generator=g)).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def start_state(d_in: int, d_sae: int, x: torch.Tensor, l0: int, device: str) -> S.SparseAutoencoder:
    """An SAE whose features each fire on about l0/d_sae of the tokens of x."""
    sae = S.SparseAutoencoder(d_in, d_sae, seed=0, device=device)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        pre = (x[:2048] - sae.b_dec) @ sae.W_enc
        q = 1.0 - l0 / d_sae
        sae.b_enc.copy_(-torch.quantile(pre.float().cpu(), q, dim=0).to(device))
    return sae


def bench_steps(args, device: str) -> dict:
    d_in, batch = args.d_in, args.batch
    d_sae = int(args.expansion * d_in)
    data = synthetic_activations(batch * 4, d_in, 0, device)
    scale = S.input_scale(data[:batch])
    data = data * scale
    base = start_state(d_in, d_sae, data, args.l0, device)
    settings = S.SAETrainSettings(expansion=args.expansion, l1=args.l1, steps=10**9, batch_size=batch, lr=1e-4,
                                  warmup=0, resample_every=0)
    ln_settings = S.SAETrainSettings(expansion=args.expansion, l1=args.l1, steps=10**9, batch_size=batch, lr=1e-4,
                                     warmup=0, resample_every=0, ln_coef=1e-4)

    def ours(ln: bool):
        sae = S.SparseAutoencoder(d_in, d_sae, device=device)
        sae.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        lookup = None
        if ln:
            lookup = S.LNLookup.empty(d_sae, d_in, device=device)
            with torch.no_grad():
                for i in range(4):
                    lookup.update(data[i * batch:(i + 1) * batch], sae(data[i * batch:(i + 1) * batch])[1] > 0)
        s = ln_settings if ln else settings
        counter = {"i": 0}

        def step(x):
            out = S.train_step(sae, opt, x, s, counter["i"], lookup)
            counter["i"] += 1
            return out
        return step

    ref = ReferenceSAE(base.W_enc, base.b_enc, base.W_dec, base.b_dec, 1e-4, args.l1)
    runners = {"reference": ref.step, "ours": ours(False), "ours_ln": ours(True)}
    times = {k: [] for k in runners}
    info = {}
    for i in range(args.steps + 1):  # the first round warms up and is dropped
        x = data[(i % 4) * batch:((i % 4) + 1) * batch]
        for name, fn in list(runners.items())[::1 if i % 2 else -1]:  # alternate the order: no position bias
            sync(device)
            t0 = time.perf_counter()
            out = fn(x)
            sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
            if name == "ours_ln":
                _, _parts, pairs = out
                info["l0_measured"] = pairs.n / batch
                info["active_pair_density"] = round(pairs.n / (batch * d_sae), 5)
                info["products"] = "sparse" if pairs.sparse else "dense"
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "d_in": d_in, "d_sae": d_sae, "batch": batch, "steps_timed": args.steps,
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "activations_per_s": {k: round(batch / v, 1) for k, v in med.items()},
        "ours_vs_reference_throughput": round(med["reference"] / med["ours"], 3),
        "ln_step_vs_standard_step": round(med["ours_ln"] / med["ours"], 3),
        **info,
    }


def bench_reader(args, device: str, appetite: float) -> dict:
    from neuron_embeddings.storage.activations import ActivationCache, CacheWriter, ShuffledBatches

    rows = args.cache_rows
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "acts.zarr"
        ctx = 128
        n_seq = rows // ctx
        w = CacheWriter(path, {"bench": 1}, n_seq, ctx, args.d_in, "float16")
        t0 = time.perf_counter()
        block = synthetic_activations(4096, args.d_in, 1, "cpu").numpy().astype(np.float16)
        for i in range(0, n_seq * ctx, 4096):
            w.append(block[: min(4096, n_seq * ctx - i)])
        cache = w.finish()
        write_s = time.perf_counter() - t0
        reader = ShuffledBatches(cache, args.batch, seed=0, device=device)
        stream = reader.stream()
        next(stream)  # thread started, first buffer in
        n_batches = max(4, 3 * rows // args.batch)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            b = next(stream)
        sync(device)
        read_s = time.perf_counter() - t0
        read_rate = n_batches * args.batch / read_s
        del b, stream

        # a real training run fed by the reader: how long does the loop wait for batches?
        waited = [0.0]

        def timed(it):
            while True:
                t = time.perf_counter()
                x = next(it)
                waited[0] += time.perf_counter() - t
                yield x

        n_train = args.train_steps
        settings = S.SAETrainSettings(expansion=args.expansion, l1=args.l1, steps=n_train, batch_size=args.batch,
                                      resample_every=0)
        t0 = time.perf_counter()
        S.train_sae(timed(ShuffledBatches(ActivationCache(path), args.batch, seed=1, device=device).stream()),
                    args.d_in, settings, device=device)
        sync(device)
        train_s = time.perf_counter() - t0
    return {"cache_rows": n_seq * ctx, "cache_mb": round(n_seq * ctx * args.d_in * 2 / 2**20, 1),
            "write_rows_per_s": round(n_seq * ctx / write_s, 1), "read_rows_per_s": round(read_rate, 1),
            "training_appetite_rows_per_s": round(appetite, 1), "read_vs_appetite": round(read_rate / appetite, 2),
            "train_run_steps": n_train, "train_run_s": round(train_s, 2),
            "train_run_wait_share": round(waited[0] / train_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d-in", type=int, default=3072)
    ap.add_argument("--expansion", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up round)")
    ap.add_argument("--l0", type=int, default=64, help="active features per token at the start state")
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--cache-rows", type=int, default=32768)
    ap.add_argument("--train-steps", type=int, default=4, help="steps of the reader-fed training run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.d_in, args.batch, args.steps, args.cache_rows, args.train_steps = 512, 1024, 5, 16384, 20
    device = args.device
    torch.manual_seed(0)
    t0 = time.time()
    steps = bench_steps(args, device)
    reader = bench_reader(args, device, steps["activations_per_s"]["ours"])
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": device, "torch": torch.__version__,
                          "load_avg": [round(x, 2) for x in os.getloadavg()]},
              "command": " ".join(sys.argv), "steps": steps, "reader": reader, "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(report, indent=2))
    s, r = steps, reader
    print(f"\ntraining step, d_in {s['d_in']} x {s['d_sae']} features, batch {s['batch']} ({device}):")
    for k in ("reference", "ours", "ours_ln"):
        print(f"  {k:10s} {s['step_s'][k]:8.3f} s/step  {s['activations_per_s'][k]:12,.0f} activations/s")
    print(f"  ours / reference throughput: {s['ours_vs_reference_throughput']:.2f}x (target >= 1.0)")
    print(f"  L_N step / standard step:    {s['ln_step_vs_standard_step']:.2f}x (target <= 1.5; "
          f"L0 {s['l0_measured']:.0f}, {s['products']} products over active pairs)")
    print(f"cache read: {r['read_rows_per_s']:,.0f} rows/s vs training appetite {r['training_appetite_rows_per_s']:,.0f} "
          f"rows/s = {r['read_vs_appetite']:.1f}x; reader-fed training waited {100 * r['train_run_wait_share']:.1f}% of its time")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
