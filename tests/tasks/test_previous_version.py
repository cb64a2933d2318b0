"""With both new switches off (--no-prepend-bos --no-exclude-special-tokens), a run gives exactly the
store of the code before them: a fixture made by commit 57163a9 (tests/data), on the session's tiny
random GPT-2 (built deterministically from its seed). The selection (tokens, sequences, positions,
cluster labels and counts) must be identical; the float arrays identical up to float32 rounding,
because the forward's last bits depend on the CPU's kernels (the fixture came from an Intel CPU; on
an AMD EPYC the activations differ by at most 2.1e-7, every integer array is the same)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import contract_arrays, options, run_stages

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "v57163a9_tiny_gpt2_layer1.npz"


def test_switches_off_equal_the_previous_code(tiny_gpt2, tmp_path):
    with np.load(FIXTURE, allow_pickle=False) as z:
        want = {k.replace("__", "/"): z[k] for k in z.files if k != "vocab"}
    out = str(tmp_path / "s.zarr")
    run_stages(out, **options(tiny_gpt2, layers="1", n_sequences=16, ctx_len=16, k=4, shard_size=128,
                              prepend_bos=False, exclude_special_tokens=False))
    got = contract_arrays(out, extra=["topk/window"])
    assert set(want) == set(got) - {"vocab"}
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
        if want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)  # NaN == NaN
        else:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
