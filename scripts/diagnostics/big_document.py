"""Peak memory and time of packing one big document, in pieces (the default) or whole.

    python scripts/diagnostics/big_document.py MODEL_DIR 29          # a 29 MiB document, in pieces
    python scripts/diagnostics/big_document.py MODEL_DIR 29 --whole  # tokenized whole (as before)

The document is CPython's documentation topics repeated; the rows are 1024 x 128 tokens. Run each
in its own process: the peak RSS is the process's.
"""
from __future__ import annotations

import argparse
import resource
import time

from pydoc_data.topics import topics
from transformers import AutoTokenizer

from neuron_embeddings.core.datasets import pack_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("mib", type=int)
    ap.add_argument("--whole", action="store_true")
    a = ap.parse_args()
    base = "\n\n".join(topics[k] for k in sorted(topics))
    doc = (base * (a.mib * 2**20 // len(base) + 1))[:a.mib * 2**20]
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    pack_tokens([doc], tok, 1024, 128, **({"piece_chars": 10**12} if a.whole else {}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{a.mib} MiB document, {'whole' if a.whole else 'in pieces'}: {time.perf_counter() - t0:.1f} s, "
          f"peak RSS {peak:.0f} MiB ({peak - before:+.0f} MiB while packing)")


if __name__ == "__main__":
    main()
