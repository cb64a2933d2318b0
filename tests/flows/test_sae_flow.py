"""The SAE flow end to end on a real Prefect server, and the comparison figures against NumPy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from neuron_embeddings.tasks.sae_report import (
    effective_dims,
    markdown_table,
    peak_token_perplexity,
    unit_summary,
)


def test_unit_summary_against_direct_numpy():
    m = {"n_examples": np.array([5, 1, 4, 0, 6]), "n_clusters": np.array([1, 1, 3, 0, 2]),
         "max_distance": np.array([0.2, np.nan, 0.9, np.nan, 0.7], dtype=np.float32),
         "mean_distance": np.array([0.1, np.nan, 0.5, np.nan, 0.4], dtype=np.float32),
         "mean_intra": np.array([0.1, np.nan, 0.2, np.nan, np.nan], dtype=np.float32),
         "mean_inter": np.array([np.nan, np.nan, 0.8, np.nan, 0.6], dtype=np.float32)}
    s = unit_summary(m)
    assert s["units"] == 5 and s["units_with_examples"] == 3  # units 0, 2, 4
    assert s["mean_distance"] == pytest.approx((0.1 + 0.5 + 0.4) / 3)
    assert s["max_distance"] == pytest.approx((0.2 + 0.9 + 0.7) / 3)
    assert s["clusters_mean"] == pytest.approx(2.0) and s["clusters_median"] == 2.0
    assert s["mean_intra"] == pytest.approx(0.15) and s["mean_inter"] == pytest.approx(0.7)
    assert s["share_single_cluster"] == pytest.approx(1 / 3)
    table = markdown_table([{"units_kind": "neurons", **s}])
    assert table.count("\n") == 2 and "| neurons | 5 | 3 |" in table


def test_peak_token_perplexity_and_effective_dims():
    tokens = np.array([[5, 6, 7], [5, 5, 9]])
    seq = np.array([[0, 1, 1, -1], [0, 1, 0, 1], [1, -1, -1, -1]])
    pos = np.array([[0, 0, 1, -1], [1, 2, 1, 2], [0, -1, -1, -1]])
    ppl = peak_token_perplexity(seq, pos, tokens)  # unit 0: tokens 5, 5, 5; unit 1: 6, 9, 6, 9; unit 2: one example
    assert ppl[0] == pytest.approx(1.0) and ppl[1] == pytest.approx(2.0) and np.isnan(ppl[2])
    W = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, 1.0]])  # unit 0 reads one dimension, unit 1 four
    np.testing.assert_allclose(effective_dims(W), [1.0, 4.0])


def test_sae_flow_end_to_end(prefect_server, tiny_gpt2, tmp_path):
    from neuron_embeddings.flows.sae import sae_flow
    from tests.flows.test_flow import _latest_artifact

    out = tmp_path / "sae-flow"
    result = sae_flow(out=str(out), model=tiny_gpt2, layer=1, n_sequences=16, ctx_len=16, expansion=0.5, l1=1.0,
                      ln_coef=1e-3, steps=30, batch_size=64, k=4, shard_size=64, device="cpu", strata="0.5,0",
                      strata_k=2)
    rows = {r["units_kind"]: r for r in result["rows"]}
    assert list(rows) == ["neurons", "sae-standard", "sae-ln"]
    assert rows["neurons"]["units"] == 256 and rows["sae-standard"]["units"] == rows["sae-ln"]["units"] == 128
    assert rows["neurons"]["explained_variance"] is None and rows["sae-ln"]["explained_variance"] is not None
    for name, d in result["sae_dirs"].items():
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        assert rows[name]["l0"] == metrics["l0"]
        assert (metrics["ln_coef"] > 0) == (name == "sae-ln")
    for name, url in result["stores"].items():
        g = zarr.open_group(url, mode="r")
        assert g.attrs["unit"] == ("mlp-neuron" if name == "neurons" else "sae-feature")
        n_ex = g["metrics/n_examples"][0]
        assert rows[name]["units_with_examples"] == int((n_ex >= 2).sum())
    report = (out / "report.md").read_text()
    assert report.count("\n| ") >= 3 and (out / "comparison.png").stat().st_size > 1000
    # across the spectrum (strata): every unit kind, figures read from its store
    assert "## Across the activation spectrum" in report
    for name, url in result["stores"].items():
        g = zarr.open_group(url, mode="r")
        have = g["metrics/n_examples"][0] >= 2
        sp = rows[name]["spectrum"]
        assert sp["sources"] == ["top-k", "0.5-1 x max", "0-0.5 x max"]
        assert sp["clusters"][1] == pytest.approx(g["strata/n_clusters"][0][have, 1].mean())
        assert sp["below_top_per_unit"] == pytest.approx(g["strata/below_only"][0][have].mean())
    assert "sae-ln" in _latest_artifact("sae-comparison").data
    assert float(_latest_artifact("sae-flow-progress").data) == 100.0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    sae_flow(out=str(out), model=tiny_gpt2, layer=1, n_sequences=16, ctx_len=16, expansion=0.5, l1=1.0,
             ln_coef=1e-3, steps=30, batch_size=64, k=4, shard_size=64, device="cpu", strata="0.5,0",
             strata_k=2)  # resumes: nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == before
