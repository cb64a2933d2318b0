"""Where in a row do a neuron's top examples sit? The first-token artifact, with and without BOS.

Runs `neuron-embeddings run` on a model twice, with `--no-prepend-bos --no-exclude-special-tokens`
(rows cut from the stream, every token eligible: the behaviour before schema 2) and with the
defaults, then prints per layer: the share of examples at position 0 and 1, against the uniform
share 1/ctx_len, and the share of neurons with most of their examples at one position.

    .venv/bin/python scripts/experiments/first_token.py --model builtin:smollm2-135m --layers 10,29
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr


def run(model: str, out: Path, layers: str, n_sequences: int, ctx_len: int, k: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "neuron_embeddings.cli", "run", "--model", model, "--dataset", "builtin:python-docs",
           "--out", str(out), "--layers", layers, "--n-sequences", str(n_sequences), "--ctx-len", str(ctx_len),
           "--k", str(k), "--shard-size", "1536", "--no-similar", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def position_shares(store: Path) -> list[dict]:
    g = zarr.open_group(str(store), mode="r")
    rows = []
    for row, layer in enumerate(g.attrs["layers"]):
        pos = g["topk/pos"][row]  # [M, k]
        have = pos >= 0
        p = pos[have]
        T = g.attrs["ctx_len"]
        counts = np.stack([(pos == t).sum(axis=1) for t in range(T)], axis=1)  # [M, T]
        majority = (counts.max(axis=1) > have.sum(axis=1) / 2) & (have.sum(axis=1) > 0)
        at0 = (counts[:, 0] > have.sum(axis=1) / 2) & (have.sum(axis=1) > 0)
        rows.append({"layer": layer, "pos0": float((p == 0).mean()), "pos1": float((p == 1).mean()),
                     "uniform": 1 / T, "neurons_mostly_pos0": float(at0.mean()),
                     "neurons_mostly_one_pos": float(majority.mean())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--layers", default="10,29")
    ap.add_argument("--n-sequences", type=int, default=256)
    ap.add_argument("--ctx-len", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("before (no BOS, all tokens)", ["--no-prepend-bos", "--no-exclude-special-tokens"]),
                            ("defaults (BOS, special tokens excluded)", [])):
            out = Path(tmp) / f"{len(extra)}.zarr"
            run(a.model, out, a.layers, a.n_sequences, a.ctx_len, a.k, extra)
            g = zarr.open_group(str(out), mode="r")
            print(f"\n{a.model}, {name}: prepend_bos={g.attrs['prepend_bos']}, "
                  f"excluded_token_ids={g.attrs['excluded_token_ids']}, {a.n_sequences} x {a.ctx_len} tokens, k={a.k}")
            print(f"  {'layer':>5} {'at pos 0':>9} {'at pos 1':>9} {'uniform':>8} {'neurons: most at pos 0':>23}"
                  f" {'most at one pos':>16}")
            for r in position_shares(out):
                print(f"  {r['layer']:>5} {100 * r['pos0']:>8.1f}% {100 * r['pos1']:>8.1f}% {100 * r['uniform']:>7.1f}%"
                      f" {100 * r['neurons_mostly_pos0']:>22.1f}% {100 * r['neurons_mostly_one_pos']:>15.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
