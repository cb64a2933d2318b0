#!/usr/bin/env python
"""The model's forward in float32 against bfloat16 (or float16), on this machine, in one run.

    .venv/bin/python benchmarks/bench_dtype.py [--model DIR|builtin:smollm2-135m] [--dtype bfloat16]
                                               [--n-sequences 128] [--ctx-len 128] [--rounds 3]

Without --model: a random-weight GPT-2-small-shaped model (12 layers, d_model 768), built once in
--workdir. Two measurements:

1. Scan speed: ``core.scan.scan_sequences`` (every layer, k = 50, the CLI's tokens, BOS and special
   tokens as the CLI feeds them) over the same tokens, float32 and the reduced dtype alternated in
   ``--rounds`` rounds (order alternating), so machine drift hits both alike; reported: the median
   of the per-round speed ratios (reduced / float32) and each dtype's median tokens/s.
2. Agreement: the whole pipeline (every registry stage, in this process) in each dtype into two
   stores; per neuron, the share of top-k examples (sequence, position) both stores hold, and the
   adjusted Rand index of their clusterings over the examples they share (neurons with >= 2 shared
   clustered examples), averaged over neurons.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import _set_env, ensure_model, feed, pack  # noqa: E402


def scan_seconds(lm, tokens, excluded: tuple[int, ...], k: int, batch_size: int) -> float:
    import torch

    from neuron_embeddings.core.scan import scan_sequences

    t = time.perf_counter()
    scan_sequences(lm.bridge, tokens, 0, list(range(lm.n_layers)), k, torch.float16, batch_size, "cpu",
                   excluded_ids=excluded)
    return time.perf_counter() - t


def agreement(a: str, b: str) -> dict:
    """Shared top-k share and clustering ARI between two stores of the same tokens and neurons."""
    import numpy as np

    from neuron_embeddings.groundtruth.ari import adjusted_rand_index
    from neuron_embeddings.storage import schema
    from neuron_embeddings.storage.store import Store

    ga, gb = Store(a).open_read_only(), Store(b).open_read_only()
    seq_a, pos_a, lab_a = (ga[s.path][...] for s in (schema.TOPK_SEQ, schema.TOPK_POS, schema.LABELS))
    seq_b, pos_b, lab_b = (gb[s.path][...] for s in (schema.TOPK_SEQ, schema.TOPK_POS, schema.LABELS))
    shares, aris = [], []
    for r in range(seq_a.shape[0]):
        for j in range(seq_a.shape[1]):
            ea = {(s, p): lab for s, p, lab in zip(seq_a[r, j], pos_a[r, j], lab_a[r, j]) if s >= 0}
            eb = {(s, p): lab for s, p, lab in zip(seq_b[r, j], pos_b[r, j], lab_b[r, j]) if s >= 0}
            if not ea:
                continue
            both = [e for e in ea if e in eb]
            shares.append(len(both) / len(ea))
            both = [e for e in both if ea[e] >= 0 and eb[e] >= 0]
            if len(both) >= 2:
                aris.append(adjusted_rand_index(np.array([ea[e] for e in both]), np.array([eb[e] for e in both])))
    return {"topk_shared": float(np.mean(shares)), "topk_shared_min": float(np.min(shares)),
            "ari_shared": float(np.mean(aris)), "ari_neurons": len(aris), "neurons": len(shares)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or builtin name (default: random GPT-2-small shape)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--n-sequences", type=int, default=128)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ne-bench"))
    p.add_argument("--out-json")
    p.add_argument("--speed-only", action="store_true", help="measure the scan's speed only (no stores)")
    a = p.parse_args(argv)
    _set_env(a.threads)
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.groundtruth.planted import run_pipeline

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or str(ensure_model(work, 12, 50257))
    lms = {d: load_model(model, "cpu", d) for d in ("float32", a.dtype)}
    bos, excluded = feed(lms["float32"])
    tokens = pack(lms["float32"].tokenizer, a.n_sequences, a.ctx_len, bos)
    n_tok = tokens.size
    scan_seconds(lms["float32"], tokens[:a.batch_size], excluded, a.k, a.batch_size)  # warm-up
    scan_seconds(lms[a.dtype], tokens[:a.batch_size], excluded, a.k, a.batch_size)
    secs: dict[str, list[float]] = {"float32": [], a.dtype: []}
    for r in range(a.rounds):
        for d in (("float32", a.dtype) if r % 2 == 0 else (a.dtype, "float32")):
            secs[d].append(scan_seconds(lms[d], tokens, excluded, a.k, a.batch_size))
            print(f"round {r} {d}: {n_tok / secs[d][-1]:.0f} tok/s", flush=True)
    ratios = [f / h for f, h in zip(secs["float32"], secs[a.dtype])]
    res = {"model": model, "dtype": a.dtype, "tokens": int(n_tok), "rounds": a.rounds,
           "tok_s": {d: n_tok / statistics.median(v) for d, v in secs.items()},
           "speed_ratio_median": statistics.median(ratios), "speed_ratios": ratios}
    if not a.speed_only:
        stores = {}
        for d in ("float32", a.dtype):
            stores[d] = str(Path(tempfile.mkdtemp(prefix=f"dtype-{d}-", dir=work)) / "s.zarr")
            run_pipeline(stores[d], model, "builtin:python-docs", batch_size=a.batch_size,
                         n_sequences=a.n_sequences, ctx_len=a.ctx_len, k=a.k, dtype=d, prepend_bos=None,
                         exclude_special_tokens=True, similar=False)
        res.update(agreement(stores["float32"], stores[a.dtype]))
    print(json.dumps(res, indent=1))
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
