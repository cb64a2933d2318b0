#!/usr/bin/env python
"""The logits stage's cost on a model, against the scan's bare forward measured in the same run.

- forward: the model's blocks up to the last MLP (`run_until`, as the scan runs them) on batches of
  16 x 128 random tokens; projected to a default run (1024 sequences of 128 tokens);
- logits: `core.logits.logit_effects` on `--shards` shards of 256 neurons (rows W_out, the folded
  W_U, as the stage computes them), with one torch thread (as shard batches run each shard) and with
  every thread, each as the stage runs it on the CPU (bfloat16 products screening the candidates,
  re-scored in float64: `bf16_screen`), with float32 products and the compiled selection
  (`*_float32`), and with float32 products and `torch.topk` (`*_torch_topk`); projected to all
  neurons of the model;
- prepare: reading W_out and W_U from the bridge and writing them to a fresh store (what `prepare`
  adds), once.

    .venv/bin/python benchmarks/bench_logits.py --model /tmp/ne-bench/gpt2-random-L12-d768-v50257-s0 --vocab 50257

(`--vocab`: a random unembedding of that width, for a model whose tokenizer, and so vocabulary, is
smaller than the one measured; the cost depends only on the shapes.)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from neuron_embeddings.core.logits import bf16_screen, finite_columns, logit_effects, unembedding  # noqa: E402
from neuron_embeddings.core.models import HOOK_ACTIVATION, load_model, run_until  # noqa: E402
from neuron_embeddings.core.scan import torch_threads  # noqa: E402
from neuron_embeddings.core.units import unit_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None,
                    help="a random W_U of this many tokens instead of the model's (e.g. 50257: GPT-2's vocabulary)")
    a = ap.parse_args()
    lm = load_model(a.model, "cpu")
    units = unit_source(lm, a.model)
    layers = list(range(lm.n_layers))

    t = time.perf_counter()
    rows, w_u = units.output_rows(layers), unembedding(lm)  # the model's whole vocabulary
    if a.vocab:
        w_u = torch.randn(lm.d_model, a.vocab, generator=torch.Generator().manual_seed(0)) / lm.d_model ** 0.5
    with tempfile.TemporaryDirectory() as d:  # what prepare adds: the two arrays, written uncompressed
        from neuron_embeddings.core.settings import RunSettings
        from neuron_embeddings.storage import store as st

        s = RunSettings(model=a.model, dataset="d", layers=tuple(layers), n_sequences=2, ctx_len=8, k=2,
                        shard_size=256)
        store = st.create_store(f"{d}/s.zarr", s, {**units.info(), "logit_effects": True, "d_resid": lm.d_model},
                                w_u.shape[1])
        st.write(store, st.schema.W_OUT, (slice(None),), rows.numpy())
        st.write(store, st.schema.W_U, (slice(None),), w_u.numpy())
        t_prepare = time.perf_counter() - t
        t = time.perf_counter()
        st.read_unembedding(store)
        t_read = time.perf_counter() - t

    ids = torch.randint(0, int(lm.bridge.cfg.d_vocab), (16, 128))
    last = HOOK_ACTIVATION.format(layer=lm.n_layers - 1)
    with torch.inference_mode():
        run_until(lm.bridge, ids[:2, :16], [(last, lambda x: None)])  # warm-up
        t = time.perf_counter()
        for _ in range(a.batches):
            run_until(lm.bridge, ids, [(last, lambda x: None)])
        t_batch = (time.perf_counter() - t) / a.batches
    forward = t_batch * 1024 / 16

    flat = rows.reshape(-1, rows.shape[-1])
    n_shards = flat.shape[0] / 256
    out = {"model": a.model, "neurons": int(flat.shape[0]), "d_vocab": int(w_u.shape[1]),
           "forward_1024x128_s": round(forward, 1), "prepare_extra_s": round(t_prepare, 2),
           "read_W_U_s": round(t_read, 2), "threads": torch.get_num_threads()}
    kept, ids = finite_columns(w_u)  # once per process, as the stage does
    t = time.perf_counter()
    screen = bf16_screen(kept)
    out["screen_build_s"] = round(time.perf_counter() - t, 2)
    out["screen"] = screen is not None
    for name, threads in (("logits_1_thread", 1), ("logits_all_threads", torch.get_num_threads())):
        for selection, compiled, scr in (("", True, screen), ("_float32", True, None), ("_torch_topk", False, None)):
            with torch_threads(threads):
                logit_effects(flat[:256], kept, 10, ids_V=ids, compiled=compiled, screen=scr)  # warm-up (compilation)
                t = time.perf_counter()
                for i in range(a.shards):
                    logit_effects(flat[i * 256:(i + 1) * 256], kept, 10, ids_V=ids, compiled=compiled, screen=scr)
                per = (time.perf_counter() - t) / a.shards
            out[f"{name}{selection}_s"] = round(per * n_shards, 1)
            out[f"{name}{selection}_per_forward"] = round(per * n_shards / forward, 3)
    print(json.dumps(out, indent=1))
    assert np.isfinite(list(v for v in out.values() if isinstance(v, float))).all()


if __name__ == "__main__":
    main()
