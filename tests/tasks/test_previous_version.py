"""With both new switches off (--no-prepend-bos --no-exclude-special-tokens), a run gives exactly the
store of the code before them: a fixture made by commit 57163a9 (tests/data), on the session's tiny
random GPT-2 (built deterministically from its seed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import assert_same_arrays, contract_arrays, options, run_stages

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "v57163a9_tiny_gpt2_layer1.npz"


def test_switches_off_equal_the_previous_code(tiny_gpt2, tmp_path):
    with np.load(FIXTURE, allow_pickle=False) as z:
        want = {k.replace("__", "/"): z[k] for k in z.files if k != "vocab"}
    out = str(tmp_path / "s.zarr")
    run_stages(out, **options(tiny_gpt2, layers="1", n_sequences=16, ctx_len=16, k=4, shard_size=128,
                              prepend_bos=False, exclude_special_tokens=False))
    got = contract_arrays(out, extra=["topk/window"])
    assert set(want) == set(got) - {"vocab"}
    assert_same_arrays(want, got)
