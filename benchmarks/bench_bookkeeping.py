#!/usr/bin/env python
"""The scan's bookkeeping for one layer and batch: the torch path, the compiled one (the CPU's) on
one thread, and the compiled one with its units split over `--parts` threads (`over_units`, what
the scan does with the forward's threads).

    .venv/bin/python benchmarks/bench_bookkeeping.py [--batch 16] [--ctx-len 128] [--d-mlp 3072]
                                                     [--d-model 768] [--k 50] [--rounds 5] [--parts 2]

On random GELU activations of one layer batch [B, T, M] (a BOS-like first position excluded) and
x [B, T, D], alternated in rounds (medians of the per-round times, and their ratio):

- `maxima`: each sequence's max (torch: `batch_candidates`; compiled: `sequence_maxima`, which
  also finds the position);
- `maxima + histogram` (what `--strata` adds): torch `batch_candidates` + `add_distribution`;
  compiled `sequence_maxima` with the histogram on;
- `merge, filling`: a batch into a top-k table that the previous batch filled (nearly every
  candidate enters): torch `update_slots`; compiled `update_slots_compiled`;
- `merge, steady`: a batch into a table that has seen 64 batches (few enter).

Torch runs on one thread (the torch path's setting inside the scan). Times in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=3072)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--parts", type=int, default=2, help="threads for the split compiled column")
    p.add_argument("--out-json")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    from neuron_embeddings.core import scan as S
    from neuron_embeddings.core import scan_kernels as K
    from neuron_embeddings.core.settings import HIST_BINS

    torch.set_num_threads(1)
    B, T, M, D = a.batch, a.ctx_len, a.d_mlp, a.d_model
    gen = torch.Generator().manual_seed(0)

    def batch():
        post = torch.nn.functional.gelu(torch.randn(B, T, M, generator=gen) * 1.5)
        return post, torch.randn(B, T, D, generator=gen)

    post, x = batch()
    excluded = torch.zeros(B, T, dtype=torch.bool)
    excluded[:, 0] = True
    scale = S.histogram_scale(post.amax(dim=(0, 1)) * 1.1)
    post_np, ex_np = post.numpy(), excluded.numpy()

    def compiled_maxima(hist: bool, parts: int = 1):
        max_BM, arg_BM = np.empty((B, M), np.float32), np.empty((B, M), np.int64)
        hist_HM = np.zeros((HIST_BINS, M), np.int32) if hist else np.zeros((1, 1), np.int32)
        S.over_units(parts, K.sequence_maxima, M, post_np, ex_np, scale.numpy() if hist else np.zeros(1, np.float32),
                     hist, max_BM, arg_BM, hist_HM, np.zeros(M) if hist else np.zeros(1))
        return max_BM, arg_BM

    def torch_hist():
        S.batch_candidates(post, excluded)
        S.add_distribution(torch.zeros(M, HIST_BINS, dtype=torch.int64), torch.zeros(M, dtype=torch.float64),
                           post, scale, excluded)

    def tables(n_batches: int):
        """A torch-path and a compiled-path table after n_batches earlier batches, and the next batch."""
        t_torch, t_comp = (S.SlotTable.empty(M, a.k, D, torch.float16) for _ in range(2))
        for i in range(n_batches + 1):
            p_i, x_i = batch()
            seq = torch.arange(i * B, (i + 1) * B)
            val = S.batch_candidates(p_i, excluded)
            if i == n_batches:
                return t_torch, t_comp, (p_i, x_i, seq, val)
            S.update_slots(t_torch, val, val, p_i, seq, x_i, excluded_BT=excluded)
            t_comp.key.copy_(t_torch.key)  # the compiled table starts from the same entries
            for name in ("act", "seq", "pos", "slot", "xref", "win"):
                getattr(t_comp, name).copy_(getattr(t_torch, name))
            t_comp.pool = t_torch.pool

    def merges(n_batches: int):
        t_torch, t_comp, (p_i, x_i, seq, val) = tables(n_batches)
        snapshot = {name: getattr(t_torch, name).clone() for name in ("key", "act", "seq", "pos", "slot", "xref", "win")}
        pool_used = t_torch.pool.used

        def restore(t):
            for name, v in snapshot.items():
                setattr(t, name, v.clone())
            t.pool.used = pool_used

        p_np = p_i.numpy()
        ex = excluded.numpy()
        max_BM, arg_BM = np.empty((B, M), np.float32), np.empty((B, M), np.int64)
        K.sequence_maxima(p_np, ex, np.zeros(1, np.float32), False, max_BM, arg_BM,
                          np.zeros((1, 1), np.int32), np.zeros(1), 0, M)
        x_ND = x_i.reshape(B * T, D).to(torch.float16)
        key = max_BM.astype(np.float64)

        def run_torch():
            restore(t_torch)
            S.update_slots(t_torch, val, val, p_i, seq, x_i, excluded_BT=excluded)

        def run_comp(parts: int = 1):
            restore(t_comp)
            S.update_slots_compiled(t_comp, key, max_BM, arg_BM, seq.numpy(), p_np, x_ND, parts=parts)
        return run_torch, run_comp

    fill_torch, fill_comp = merges(1)
    steady_torch, steady_comp = merges(64)
    cases = {
        "maxima": (lambda: S.batch_candidates(post, excluded), lambda: compiled_maxima(False),
                   lambda: compiled_maxima(False, a.parts)),
        "maxima + histogram": (torch_hist, lambda: compiled_maxima(True), lambda: compiled_maxima(True, a.parts)),
        "merge, filling": (fill_torch, fill_comp, lambda: fill_comp(a.parts)),
        "merge, steady": (steady_torch, steady_comp, lambda: steady_comp(a.parts)),
    }
    times = {name: ([], [], []) for name in cases}
    for fs in cases.values():  # warm-up (and the kernels' compilation)
        for f in fs:
            f()
    for _ in range(a.rounds):
        for name, fs in cases.items():
            for i, f in enumerate(fs):
                t = time.perf_counter()
                f()
                times[name][i].append(1e3 * (time.perf_counter() - t))
    res = {"shape": {"B": B, "T": T, "M": M, "D": D, "k": a.k}, "rounds": a.rounds, "parts": a.parts, "ms_median": {}}
    print(f"one layer batch [{B}, {T}, {M}], x width {D}, k {a.k}; medians of {a.rounds} rounds (ms)")
    split = f"split x{a.parts}"
    print(f"{'':<22}{'torch':>10}{'compiled':>10}{split:>11}{'torch/compiled':>16}{'compiled/split':>16}")
    for name, (tt, tc, ts) in times.items():
        mt, mc, ms = statistics.median(tt), statistics.median(tc), statistics.median(ts)
        res["ms_median"][name] = {"torch": round(mt, 2), "compiled": round(mc, 2), "split": round(ms, 2),
                                  "torch/compiled": round(mt / mc, 2), "compiled/split": round(mc / ms, 2)}
        print(f"{name:<22}{mt:>10.2f}{mc:>10.2f}{ms:>11.2f}{mt / mc:>16.2f}{mc / ms:>16.2f}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
