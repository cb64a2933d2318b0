#!/usr/bin/env python
"""Does L_N make SAE features more monosemantic at a similar explained variance? The SAE flow on
the model with planted features and on all-MiniLM-L6-v2, with several L_N coefficients.

    .venv/bin/python scripts/experiments/sae_science.py --which planted|minilm|both --workdir DIR [--steps N]

Each model gets one `flows/sae.py:sae_flow` run (a temporary Prefect server starts if none is
configured): the layer's MLP neurons, a standard SAE and one L_N SAE per coefficient, all evaluated
with the neuron-embedding pipeline. The tables (DIR/<model>/report.md) are printed at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # scripts/experiments/ -> the repository root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLANTED = dict(layer=0, n_sequences=768, ctx_len=32, expansion=4, l1=1.0, ln_coef=[1e-3, 1e-2, 1e-1], steps=1500,
               batch_size=1024, k=50)
MINILM = dict(model="builtin:all-MiniLM-L6-v2", dataset="builtin:python-docs", layer=3, n_sequences=768, ctx_len=64,
              expansion=2, l1=2.0, ln_coef=[1e-3, 1e-2], steps=1000, batch_size=1024, k=50)


def planted_inputs(workdir: Path) -> dict:
    from neuron_embeddings.core.synthetic import build_planted_model, write_planted_corpus

    model = workdir / "planted-model"
    truth = build_planted_model(model, seed=0)
    corpus = write_planted_corpus(workdir / "planted.txt", truth, n_docs=3000, doc_len=16, seed=0)
    return {"model": str(model), "dataset": str(corpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", default="both", choices=["planted", "minilm", "both"])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=None, help="override the training steps of both")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from neuron_embeddings.flows.sae import sae_flow

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.which in ("planted", "both"):
        runs.append(("planted", {**PLANTED, **planted_inputs(work)}))
    if args.which in ("minilm", "both"):
        runs.append(("minilm", dict(MINILM)))
    for name, params in runs:
        if args.steps:
            params["steps"] = args.steps
        sae_flow(out=str(work / name), device=args.device, **params)
    for name, _ in runs:
        print(f"\n## {name}\n")
        print((work / name / "report.md").read_text())


if __name__ == "__main__":
    main()
