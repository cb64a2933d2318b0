"""The logits stage: each unit's most promoted and most suppressed tokens equal a direct computation on
the unfolded Hugging Face model (W_out[j], the final norm's gain, lm_head), for a LayerNorm GPT-2, a
gated RMSNorm Llama and an SAE's decoder rows; the stage obeys markers, integrity and resume."""
from __future__ import annotations

import json

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from neuron_embeddings.core.sae_io import SAEWeights, save_sae
from neuron_embeddings.core.synthetic import build_random_model
from neuron_embeddings.storage import integrity
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.registry import repair_store, stage_units
from tests.helpers import marker_root, options, run_stages

SMALL = dict(n_sequences=8, ctx_len=16, k=4)


def _direct(rows_MD: np.ndarray, gain_D: np.ndarray, lm_head_VD: np.ndarray, layer_norm: bool) -> np.ndarray:
    """w_j . (g * W_U) minus its mean over the vocabulary, w_j centred first under a LayerNorm (the
    README's definition), in float64 from the unfolded weights."""
    w = rows_MD.astype(np.float64)
    if layer_norm:
        w = w - w.mean(1, keepdims=True)
    v = w @ (gain_D.astype(np.float64)[:, None] * lm_head_VD.T.astype(np.float64))
    return v - v.mean(1, keepdims=True)


def _check(g, row: int, want_MV: np.ndarray) -> None:
    for side, order in (("top", np.argsort(-want_MV, 1)), ("bottom", np.argsort(want_MV, 1))):
        tokens = g[f"logits/{side}_tokens"][row]
        assert np.array_equal(tokens, order[:, :10]), side
        want = np.take_along_axis(want_MV, order[:, :10], 1)
        np.testing.assert_allclose(g[f"logits/{side}_values"][row], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _hf(model: str):
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def test_gpt2_equals_the_unfolded_model_and_resumes(tiny_gpt2, tmp_path):
    out = str(tmp_path / "s.zarr")
    g = run_stages(out, **options(tiny_gpt2, **SMALL))
    hf = _hf(tiny_gpt2)
    assert g.attrs["logit_effects"] is True and g["logits/top_tokens"].shape == (2, 256, 10)
    for row, layer in enumerate(g.attrs["layers"]):
        w_out = _np(hf.transformer.h[layer].mlp.c_proj.weight)  # Conv1D: [d_mlp, d_model]
        _check(g, row, _direct(w_out, _np(hf.transformer.ln_f.weight), _np(hf.lm_head.weight), layer_norm=True))

    # integrity, resume, repair: a lost chunk of one shard is found, only that shard recomputed
    store = Store(out)
    assert integrity.verify(store).ok
    settings = store.settings()
    units = stage_units("logits", settings, 256)
    plan = json.loads((marker_root(out).parent / "plan.json").read_text())
    assert plan["logits"] == units and len(units) == 8
    before = g["logits/top_values"][...]
    (tmp_path / "s.zarr" / "logits" / "top_values" / "c" / "1" / "1" / "0").unlink()
    damaged = integrity.damaged_units(store)
    assert set(damaged) == {("logits", "L01-N00064")}
    repair_store(out)
    done = {p.stem for p in (marker_root(out) / "logits").glob("*.done")}
    assert done == set(units) - {"L01-N00064"}
    mtimes = {p: p.stat().st_mtime_ns for p in marker_root(out).rglob("*.done")}
    g = run_stages(out, **options(tiny_gpt2, **SMALL))  # resume: only the cleared shard runs
    changed = {p for p in marker_root(out).rglob("*.done") if mtimes.get(p) != p.stat().st_mtime_ns}
    assert {(p.parent.name, p.stem) for p in changed} == {("logits", "L01-N00064")}
    np.testing.assert_array_equal(g["logits/top_values"][...], before)
    assert integrity.verify(Store(out)).ok


def test_gated_llama_uses_the_down_projection(tmp_path):
    model = str(build_random_model(tmp_path / "llama", "llama", seed=1))
    g = run_stages(str(tmp_path / "s.zarr"), **options(model, shard_size=64, **SMALL))
    hf = _hf(model)
    assert g.attrs["gated"] is True and g.attrs["logit_effects"] is True
    for row, layer in enumerate(g.attrs["layers"]):
        down = _np(hf.model.layers[layer].mlp.down_proj.weight).T  # [d_mlp, d_model]
        _check(g, row, _direct(down, _np(hf.model.norm.weight), _np(hf.lm_head.weight), layer_norm=False))


def test_sae_store_uses_the_decoder_rows(tiny_gpt2, tmp_path):
    gen = torch.Generator().manual_seed(0)
    D, F = 64, 40
    sae = SAEWeights(W_enc=torch.randn(D, F, generator=gen), b_enc=torch.randn(F, generator=gen) - 0.5,
                     W_dec=torch.randn(F, D, generator=gen), b_dec=torch.randn(D, generator=gen),
                     cfg={"hook_name": "blocks.1.hook_resid_mid", "architecture": "standard"})
    save_sae(tmp_path / "sae", sae)
    g = run_stages(str(tmp_path / "s.zarr"), **options(tiny_gpt2, sae=str(tmp_path / "sae"), shard_size=16, **SMALL))
    hf = _hf(tiny_gpt2)
    assert g.attrs["unit"] == "sae-feature" and g["logits/top_tokens"].shape == (1, F, 10)
    _check(g, 0, _direct(sae.W_dec.numpy(), _np(hf.transformer.ln_f.weight), _np(hf.lm_head.weight), layer_norm=True))
