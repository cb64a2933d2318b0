#!/usr/bin/env python
"""Check that SAE directories written by `neuron_embeddings.core.sae_io.save_sae` load in the real SAELens.

SAELens pins transformer-lens < 4, so it cannot live in this project's environment; run this in a
separate one (it imports only `sae_io`, which needs torch and safetensors):

    python3.11 -m venv /tmp/sl && /tmp/sl/bin/pip install torch==2.13.0 sae-lens   # or 'sae-lens<6'
    HF_HUB_OFFLINE=1 /tmp/sl/bin/python scripts/interop/check_saelens_load.py [SAE_DIR ...]

Without arguments it writes a standard and a TopK SAE with random weights to a temporary directory.
For each directory: SAELens's `SAE.load_from_disk` (6.x) or `load_from_pretrained` (5.x), then its
`encode`/`decode` against the maths on the raw tensors. Exits 1 on any difference above 1e-5.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # scripts/interop/ -> the repository root
sys.path.insert(0, str(ROOT))


def example_dirs(tmp: Path) -> list[str]:
    import torch

    from neuron_embeddings.core.sae_io import SAEWeights, save_sae

    g = torch.Generator().manual_seed(0)
    out = []
    for arch, extra in (("standard", {}), ("topk", {"k": 5})):
        w = SAEWeights(torch.randn(16, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, 16, generator=g),
                       torch.randn(16, generator=g),
                       {"hook_name": "blocks.2.mlp.hook_post", "model_name": "gpt2", "architecture": arch, **extra})
        save_sae(tmp / arch, w)
        out.append(str(tmp / arch))
    return out


def check(d: str) -> float:
    import sae_lens
    import torch
    from safetensors.torch import load_file
    from sae_lens import SAE

    load = getattr(SAE, "load_from_disk", None) or SAE.load_from_pretrained
    sae = load(d, device="cpu")
    t = load_file(str(Path(d) / "sae_weights.safetensors"))
    cfg = json.loads((Path(d) / "cfg.json").read_text())
    x = torch.randn(64, t["W_enc"].shape[0]).relu()
    f = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]).relu()
    if cfg["architecture"] == "topk":
        v, i = f.topk(cfg["k"], dim=1)
        f = torch.zeros_like(f).scatter(1, i, v)
    with torch.no_grad():
        fs = sae.encode(x)
        xs = sae.decode(fs)
    meta = getattr(sae.cfg, "metadata", None) or sae.cfg
    err = max(float((fs - f).abs().max()), float((xs - (f @ t["W_dec"] + t["b_dec"])).abs().max()))
    print(f"sae-lens {sae_lens.__version__}: {d}: {type(sae).__name__} at {meta.hook_name}, max error {err:.3g}")
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", metavar="SAE_DIR",
                    help="SAE directories to check (default: a standard and a TopK SAE with random weights)")
    dirs = ap.parse_args().dirs
    with tempfile.TemporaryDirectory() as tmp:
        if not dirs:
            dirs = example_dirs(Path(tmp))
        worst = max(check(d) for d in dirs)
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
