#!/usr/bin/env python
"""What `--strata` costs the scan, on this machine, in one run.

    .venv/bin/python benchmarks/bench_strata.py [--model DIR|builtin:smollm2-135m] [--n-sequences 64]
                                                [--ctx-len 128] [--rounds 3] [--strata 0.75,0.5,0.25,0]

Without --model: the random-weight GPT-2-small-shaped model of bench_pipeline.py (12 layers,
d_model 768, 36,864 neurons), built once in --workdir. Over the same tokens (the CLI's: BOS and
special tokens as the CLI feeds them), alternated in --rounds rounds (the order rotating, so the
machine's drift hits all alike):

- `bare`: the forward pass up to the last layer's MLP activation, hooks doing nothing;
- `maxima`: the maxima pass (`scan_sequences(mode="max")`), which --strata adds before the scan;
- `top`: the scan as a run without --strata does it (top-k, k = 50, every layer);
- `strata`: the scan with the strata tables and the activation histograms on.

Reported: the median over rounds of each path's speed relative to `bare` (bare seconds / path
seconds: 1.0 = as fast as the bare forward), and of `strata` relative to `top`; and inside
one `strata` scan the seconds spent in the strata's table updates and in the histograms: on the
CPU (compiled bookkeeping) `sequence_maxima` is the one pass over the activations that finds each
sequence's max and fills the histograms, and `add_distribution` (the torch path's) stays 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import _set_env, _stop_at, ensure_model, feed, pack  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or builtin name (default: random GPT-2-small shape)")
    p.add_argument("--n-sequences", type=int, default=64)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--strata", default="0.75,0.5,0.25,0")
    p.add_argument("--strata-k", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", default="0,0",
                   help="activations recorded around each example's max token, BEFORE,AFTER (a run's: 24,8; "
                        "default 0,0, as this benchmark has always run: the windows' fill is the top-k's, not the strata's)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ne-bench"))
    p.add_argument("--out-json")
    a = p.parse_args(argv)
    _set_env(a.threads)
    import numpy as np
    import torch

    import neuron_embeddings.core.scan as scan_mod
    import neuron_embeddings.core.scan_kernels as kernels_mod
    from neuron_embeddings.core.models import HOOK_ACTIVATION, load_model
    from neuron_embeddings.core.settings import parse_strata, strata_intervals

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or str(ensure_model(work, 12, 50257))
    lm = load_model(model, "cpu", "float32")
    bos, excluded = feed(lm)
    tokens = pack(lm.tokenizer, a.n_sequences, a.ctx_len, bos)
    layers = list(range(lm.n_layers))
    intervals = strata_intervals(parse_strata(a.strata))
    window = tuple(int(v) for v in a.window.split(","))
    bare_fn = _stop_at(lm.bridge, HOOK_ACTIVATION.format(layer=max(layers)))
    ids_all = torch.from_numpy(tokens.astype(np.int64))

    def bare():
        with torch.inference_mode():
            for s in range(0, len(tokens), a.batch_size):
                bare_fn(ids_all[s:s + a.batch_size])

    def scan(mode="top", gmax=None, spectrum=None):
        return scan_mod.scan_sequences(lm.bridge, tokens, 0, layers, a.k, torch.float16, a.batch_size, "cpu",
                                       mode=mode, gmax_LM=gmax, excluded_ids=excluded, spectrum=spectrum,
                                       window=window)

    def new_spectrum():
        return scan_mod.Spectrum.empty(intervals, len(layers), lm.d_mlp, a.strata_k, lm.d_model, torch.float16,
                                       window=window)

    def release(out) -> None:
        """Free a scan's pools now, as the CLI's scan task does (tasks/scan.py): a pool and its tables
        refer to each other, so otherwise the cycle collector frees them (GPT-2 shape, 256 x 128
        tokens: 600 MB) in the middle of a later scan, which then pays for it."""
        for table in out if isinstance(out, list) else []:
            table.pool.release()

    gmax = scan("max")  # also the warm-up
    paths = {"bare": bare, "maxima": lambda: scan("max"), "top": scan,
             "strata": lambda: scan(gmax=gmax, spectrum=new_spectrum())}
    secs: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()  # untimed: no earlier path's garbage is collected inside this one
            t = time.perf_counter()
            out = paths[name]()
            secs[name].append(time.perf_counter() - t)
            release(out)
            print(f"round {r} {name}: {secs[name][-1]:.1f} s", flush=True)

    # inside one strata scan: the strata's table updates, and the histograms (the torch path) or the
    # one pass that finds the maxima and fills the histograms (the compiled path, the CPU's)
    inner = {"strata_update_slots": 0.0, "add_distribution": 0.0, "sequence_maxima": 0.0}
    patched = [(scan_mod, "update_slots"), (scan_mod, "update_slots_compiled"), (scan_mod, "add_distribution"),
               (scan_mod, "strata_keys"), (scan_mod, "strata_keys_compiled"), (kernels_mod, "sequence_maxima")]
    originals = {(mod, name): getattr(mod, name) for mod, name in patched}
    in_strata = {"on": False}

    def timed(mod, name, bucket=None, strata_only=False, flag=None):
        orig = originals[mod, name]

        def fn(*args, **kw):
            if flag is not None:
                in_strata["on"] = flag
            t = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                if bucket and (in_strata["on"] or not strata_only):
                    inner[bucket] += time.perf_counter() - t
        return fn

    scan_mod.update_slots = timed(scan_mod, "update_slots", "strata_update_slots", strata_only=True)
    scan_mod.update_slots_compiled = timed(scan_mod, "update_slots_compiled", "strata_update_slots", strata_only=True)
    scan_mod.add_distribution = timed(scan_mod, "add_distribution", "add_distribution", flag=False)
    scan_mod.strata_keys = timed(scan_mod, "strata_keys", flag=True)
    scan_mod.strata_keys_compiled = timed(scan_mod, "strata_keys_compiled", flag=True)
    kernels_mod.sequence_maxima = timed(kernels_mod, "sequence_maxima", "sequence_maxima", flag=False)
    try:
        gc.collect()
        t = time.perf_counter()
        release(scan(gmax=gmax, spectrum=new_spectrum()))
        inner["strata_scan"] = time.perf_counter() - t
    finally:
        for (mod, name), orig in originals.items():
            setattr(mod, name, orig)

    rel = {name: statistics.median(b / s for b, s in zip(secs["bare"], secs[name])) for name in names if name != "bare"}
    res = {"model": model, "tokens": int(tokens.size), "rounds": a.rounds, "strata": a.strata, "window": window,
           "strata_k": a.strata_k, "seconds_median": {n: round(statistics.median(v), 2) for n, v in secs.items()},
           "speed_vs_bare_median": {n: round(v, 3) for n, v in rel.items()},
           "strata_vs_top_median": round(statistics.median(t / s for t, s in zip(secs["top"], secs["strata"])), 3),
           "inside_one_strata_scan_seconds": {n: round(v, 2) for n, v in inner.items()}}
    print(json.dumps(res, indent=1))
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
