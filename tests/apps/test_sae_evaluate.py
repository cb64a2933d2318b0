"""SAE evaluation stores: the pipeline over an SAE's features, written in the contract's schema."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from neuron_embeddings.cli import main
from neuron_embeddings.core.models import load_model
from tests.helpers import CONTRACT_ARRAYS, options, run_stages

D_SAE = 96


def write_saelens_dir(path, d_in: int, d_sae: int, hook: str, layer: int, seed: int = 0,
                      architecture: str = "standard", k: int | None = None):
    """An SAE directory written by hand in SAELens's on-disk layout (pre-6 cfg keys at the top level)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
               "b_enc": torch.randn(d_sae, generator=g) * 0.1,
               "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5,
               "b_dec": torch.randn(d_in, generator=g) * 0.1}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "hook_name": hook, "hook_layer": layer,
           "model_name": "tiny-gpt2", "apply_b_dec_to_input": True, "dtype": "float32", "device": "cpu",
           "context_size": 32, "normalize_activations": "none"}
    if k is not None:
        cfg["activation_fn_kwargs"] = {"k": k}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def _features(model_path, tokens, hook, t):
    """Pre-activations and activations of every feature at every token, from an independent forward."""
    lm = load_model(model_path, "cpu")
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter=lambda n: n == hook)
    h = cache[hook].double()
    pre = (h - t["b_dec"].double()) @ t["W_enc"].double() + t["b_enc"].double()  # [S, T, F]
    return pre.numpy(), torch.relu(pre).numpy()


@pytest.fixture(scope="module")
def sae_store(tiny_gpt2, tmp_path_factory):
    d = tmp_path_factory.mktemp("sae")
    t = write_saelens_dir(d / "sae", 256, D_SAE, "blocks.1.mlp.hook_post", 1)
    out = str(d / "s.zarr")
    g = run_stages(out, **options(tiny_gpt2, sae=str(d / "sae"), k=5, shard_size=32))
    return g, t


def test_sae_store_schema_and_identity(tiny_gpt2, sae_store):
    g, t = sae_store
    assert g.attrs["unit"] == "sae-feature" and g.attrs["d_mlp"] == D_SAE and g.attrs["d_model"] == 256
    assert g.attrs["n_layers"] == 1 and g.attrs["layers"] == [1]
    for name in CONTRACT_ARRAYS[2:]:
        assert g[name].shape[:2] == (1, D_SAE), name
    assert g["embeddings"].shape == (1, D_SAE, 5, 256)
    pre, _ = _features(tiny_gpt2, g["tokens"][...], "blocks.1.mlp.hook_post", t)
    seq, pos, e = g["topk/seq"][0], g["topk/pos"][0], g["embeddings"][0].astype(np.float64)
    have = seq >= 0
    assert have.sum() > D_SAE
    j = np.broadcast_to(np.arange(D_SAE)[:, None], seq.shape)
    want = pre[seq[have], pos[have], j[have]]
    got = e.sum(-1)[have] + t["b_enc"].numpy()[j[have]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sae_top_examples_equal_brute_force(tiny_gpt2, sae_store):
    g, t = sae_store
    tokens = g["tokens"][...]
    _, f = _features(tiny_gpt2, tokens, "blocks.1.mlp.hook_post", t)
    excluded = np.isin(tokens, g.attrs["excluded_token_ids"])  # special tokens: never an example's max
    assert g.attrs["prepend_bos"] and excluded[:, 0].all()  # the defaults on a causal model: BOS rows
    per_seq = np.where(excluded[:, :, None], -np.inf, f).max(axis=1)  # [S, F]
    for j in range(D_SAE):
        order = np.lexsort((np.arange(per_seq.shape[0]), -per_seq[:, j]))[:5]
        np.testing.assert_array_equal(g["topk/seq"][0, j], order)
        np.testing.assert_allclose(g["topk/act"][0, j], per_seq[order, j], rtol=1e-5, atol=1e-6)
    assert (g["metrics/n_examples"][0] <= 5).all()


def test_sae_evaluate_cli_and_bad_input(tiny_gpt2, tmp_path, capsys, prefect_server):
    write_saelens_dir(tmp_path / "sae", 256, D_SAE, "blocks.0.mlp.hook_post", 0, architecture="topk", k=8)
    out = str(tmp_path / "e.zarr")
    base = ["sae", "evaluate", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--n-sequences", "12",
            "--ctx-len", "16", "--k", "4", "--shard-size", "48"]
    assert main([*base, "--sae", str(tmp_path / "missing"), "--out", out]) == 2
    assert "--sae" in capsys.readouterr().err
    write_saelens_dir(tmp_path / "wide", 64, 8, "blocks.0.mlp.hook_post", 0)  # d_in 64 at a 256-wide hook
    assert main([*base, "--sae", str(tmp_path / "wide"), "--out", out]) == 2
    assert "d_in=64" in capsys.readouterr().err
    import os
    assert not os.path.exists(out)
    assert main([*base, "--sae", str(tmp_path / "sae"), "--out", out]) == 0
    import zarr
    g = zarr.open_group(out, mode="r")
    assert g.attrs["unit"] == "sae-feature" and g.attrs["sae_architecture"] == "topk"
    act = g["topk/act"][0]
    assert np.isfinite(act).any() and (g["clusters/labels"][0] >= -1).all()


def test_sae_features_across_the_spectrum(tiny_gpt2, tmp_path):
    """--strata on an SAE's features: a ReLU feature is exactly 0 on most tokens, and those zeros are
    no positive activation; the histogram and strata agree with an independent forward."""
    t = write_saelens_dir(tmp_path / "sae", 256, D_SAE, "blocks.1.mlp.hook_post", 1)
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2, sae=str(tmp_path / "sae"), k=5, shard_size=32,
                                                        strata="0.5,0.2,0", strata_k=3))
    tokens = g["tokens"][...]
    _, f = _features(tiny_gpt2, tokens, "blocks.1.mlp.hook_post", t)
    keep = ~np.isin(tokens, g.attrs["excluded_token_ids"])
    f_NF = f[keep]  # [tokens counted, features]
    assert (f_NF == 0).mean() > 0.2  # many exact zeros: they must not count as positive
    hist = g["distribution/hist"][0]
    np.testing.assert_allclose(g["distribution/max"][0], f_NF.max(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g["distribution/positive_fraction"][0], (f_NF > 0).mean(axis=0), atol=2 / len(f_NF))
    for j in range(D_SAE):
        mx = f_NF[:, j].max()
        if mx <= 0:
            assert hist[j].sum() == 0
            continue
        want = np.histogram(-f_NF[:, j][f_NF[:, j] > 0], bins=hist.shape[1], range=(-mx, 0.0))[0][::-1]
        assert np.abs(hist[j] - want).sum() <= 2, j  # float32 in the scan vs float64 here, at bin edges
    act, stratum = g["strata/act"][0], g["strata/stratum"][0]
    mx = g["distribution/max"][0][:, None]
    for i, (lo, hi) in enumerate(g.attrs["strata_intervals"]):
        inside = stratum == i
        assert (act[inside] >= lo * mx.repeat(act.shape[1], 1)[inside]).all() and (act[inside] > 0).all()
        assert (act[inside] <= hi * mx.repeat(act.shape[1], 1)[inside]).all()
    assert (stratum >= 0).sum() > D_SAE
    assert g["strata/counts"][...].sum() == (g["strata/labels"][...] >= 0).sum()
