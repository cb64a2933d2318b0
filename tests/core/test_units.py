"""Unit sources (core.units) and the one way to run a model up to a hook (core.models.run_until)."""
from __future__ import annotations

import numpy as np
import torch

from neuron_embeddings.core.models import HOOK_ACTIVATION, HOOK_INPUT, HOOK_PRE, capture, load_model, run_until
from neuron_embeddings.core.sae_io import SAEWeights, save_sae
from neuron_embeddings.core.scan import scan_sequences
from neuron_embeddings.core.units import MLPNeurons, SAEFeatures, unit_source


def _ids(lm, n=3, t=12, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, lm.bridge.cfg.d_vocab, (n, t)))


def test_run_until_stops_after_the_last_hook(tiny_gpt2):
    lm = load_model(tiny_gpt2, "cpu")
    fired = []
    hooks = [(HOOK_ACTIVATION.format(layer=0), lambda t: fired.append("post0"))]
    later = ("blocks.1.hook_resid_pre", lambda t: fired.append("later"))
    with torch.inference_mode():
        lm.bridge.run_with_hooks(_ids(lm), fwd_hooks=[(later[0], lambda t, hook: fired.append("later"))])
        assert fired == ["later"]  # the hook exists and fires in a full forward
        fired.clear()
        run_until(lm.bridge, _ids(lm), hooks)
        assert fired == ["post0"]  # nothing after layer 0's MLP ran: the later hook never fired
        run_until(lm.bridge, _ids(lm), [*hooks, later])
        assert fired == ["post0", "post0", "later"]


def test_mlp_neurons_embedding_identity(tiny_gpt2):
    """sum(x * W[:, j]) + b[j] == hook_pre for every neuron: what the embedding relies on."""
    lm = load_model(tiny_gpt2, "cpu")
    units = unit_source(lm, tiny_gpt2)
    assert isinstance(units, MLPNeurons) and units.kind == "mlp-neuron"
    assert units.taps(1) == (HOOK_INPUT.format(layer=1), HOOK_ACTIVATION.format(layer=1))
    with torch.inference_mode():
        got = capture(lm.bridge, _ids(lm), [*units.taps(1), HOOK_PRE.format(layer=1)])
    post, x = units.read(got, 1)
    w = units.weights([1])
    W, b = w["W_in"], w["b_in"]
    pre = torch.einsum("btd,dm->btm", x.float(), W[0]) + b[0]
    torch.testing.assert_close(pre, got[HOOK_PRE.format(layer=1)].float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(post, got[HOOK_ACTIVATION.format(layer=1)])
    assert units.info()["unit"] == "mlp-neuron" and units.info()["d_mlp"] == lm.d_mlp
    assert units.embedding == "x*W_in" and units.d_embed == lm.d_model and not units.info()["gated"]


def _sae(lm, tmp_path, layer=1, apply_b_dec=True):
    g = torch.Generator().manual_seed(0)
    D, F = lm.d_model, 40
    w = SAEWeights(W_enc=torch.randn(D, F, generator=g), b_enc=torch.randn(F, generator=g) - 0.5,
                   W_dec=torch.randn(F, D, generator=g), b_dec=torch.randn(D, generator=g),
                   cfg={"hook_name": f"blocks.{layer}.hook_resid_mid", "architecture": "standard",
                        "apply_b_dec_to_input": apply_b_dec})
    save_sae(tmp_path / "sae", w)
    return str(tmp_path / "sae"), w


def test_sae_features_embedding_identity(tiny_gpt2, tmp_path):
    lm = load_model(tiny_gpt2, "cpu")
    path, w = _sae(lm, tmp_path)
    units = unit_source(lm, tiny_gpt2, path)
    assert isinstance(units, SAEFeatures) and units.taps(1) == ("blocks.1.hook_resid_mid",)
    assert (units.n_units, units.d_input) == (40, lm.d_model)
    with torch.inference_mode():
        got = capture(lm.bridge, _ids(lm), list(units.taps(1)))
    post, x = units.read(got, 1)
    h = got["blocks.1.hook_resid_mid"]
    w_ = units.weights([1])
    W, b = w_["W_in"], w_["b_in"]
    pre = torch.einsum("btd,df->btf", x, W[0]) + b[0]
    torch.testing.assert_close(pre, h @ w.W_enc - w.b_dec @ w.W_enc + w.b_enc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(post, torch.relu(pre), atol=1e-5, rtol=1e-5)
    assert units.info()["unit"] == "sae-feature" and units.info()["d_mlp"] == 40
    assert units.info()["embedding"] == "x*W_enc" and units.info()["d_embed"] == lm.d_model


def test_scan_is_the_same_through_either_unit_source(tiny_gpt2, tmp_path):
    """The scan sees only the unit source: an SAE whose encoder is the identity on hook_post gives
    the MLP neurons' own top-k (activations are ReLU(post) = post where post > 0)."""
    lm = load_model(tiny_gpt2, "cpu")
    M = lm.d_mlp
    ident = SAEWeights(W_enc=torch.eye(M), b_enc=torch.zeros(M), W_dec=torch.eye(M), b_dec=torch.zeros(M),
                       cfg={"hook_name": "blocks.0.mlp.hook_post", "architecture": "standard"})
    save_sae(tmp_path / "ident", ident)
    tokens = np.random.default_rng(3).integers(0, lm.bridge.cfg.d_vocab, (10, 16)).astype(np.int32)
    sae_units = unit_source(lm, tiny_gpt2, str(tmp_path / "ident"))
    via_sae = scan_sequences(lm.bridge, tokens, 0, [0], 4, torch.float32, 4, "cpu", units=sae_units)[0]
    via_mlp = scan_sequences(lm.bridge, tokens, 0, [0], 4, torch.float32, 4, "cpu")[0]
    pos = via_mlp.act > 0
    assert pos.any()
    assert torch.equal(via_sae.seq[pos], via_mlp.seq[pos]) and torch.equal(via_sae.pos[pos], via_mlp.pos[pos])
    torch.testing.assert_close(via_sae.act[pos], via_mlp.act[pos])
