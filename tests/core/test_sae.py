"""SAE training: L_N against a loop oracle, the lookup rules, identity SAEs, unit-norm decoder rows,
resampling, SAELens-layout I/O, the activation cache and its shuffled reader, `sae train` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from neuron_embeddings.core import sae as S
from neuron_embeddings.cli import main
from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.sae_io import SAEWeights, load_sae, save_sae
from neuron_embeddings.storage.activations import ActivationCache, CacheWriter, ShuffledBatches

# --- L_N ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("products", ["sparse", "dense"])
def test_ln_loss_equals_loop_value_and_gradients(monkeypatch, products):
    monkeypatch.setattr(S, "SPARSE_MAX_DENSITY", 1.0 if products == "sparse" else -1.0)
    g = torch.Generator().manual_seed(1)
    B, D, F = 7, 5, 9
    u = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    ubar = torch.randn(F, D, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(D, F, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, F, generator=g) < 0.5
    mask[0, :] = True  # a row and a column fully active, one never
    mask[:, 3] = False
    fast = S.ln_loss(u, ubar, W, mask)
    grads_fast = torch.autograd.grad(fast, (u, ubar, W))
    slow = S.ln_loss_reference(u, ubar, W, mask)
    grads_slow = torch.autograd.grad(slow, (u, ubar, W))
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-12)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: S.ln_loss(*t, mask), (u, ubar, W))


@pytest.mark.parametrize("products", ["sparse", "dense"])
@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 3)])
def test_sparse_training_pass_equals_plain_autograd(monkeypatch, products, architecture, k):
    """The training forward/backward over active pairs gives the plain autograd loss and gradients."""
    monkeypatch.setattr(S, "SPARSE_MAX_DENSITY", 1.0 if products == "sparse" else -1.0)
    g = torch.Generator().manual_seed(7)
    sae = S.SparseAutoencoder(6, 10, architecture, k, seed=1).double()
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(10, generator=g, dtype=torch.float64) * 0.5)
        sae.b_dec.copy_(torch.randn(6, generator=g, dtype=torch.float64) * 0.1)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    grads = []
    for fast in (True, False):
        sae.zero_grad()
        if fast:
            f, xhat, pairs = sae.forward_train(x)
            assert pairs.n == int((f > 0).sum())
        else:
            _, f, xhat = sae(x)
        ((xhat - x).pow(2).sum(1).mean() + 0.7 * f.sum(1).mean()).backward()
        grads.append([p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ln_loss_zero_when_inputs_match_lookup():
    """cos(h̄ ⊙ w, h ⊙ w) = 1 when h = h̄ (any positive multiple): the loss vanishes."""
    g = torch.Generator().manual_seed(2)
    ubar = torch.randn(4, 6, generator=g, dtype=torch.float64)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    u = 2.5 * ubar  # input b equals feature b's average direction
    mask = torch.eye(4, dtype=torch.bool)
    assert float(S.ln_loss(u, ubar, W, mask)) == pytest.approx(0.0, abs=1e-12)


def test_lookup_first_activation_then_ema():
    lk = S.LNLookup.empty(3, 2, momentum=0.9, rule="ema")
    x1 = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    a1 = torch.tensor([[True, False, False], [True, True, False]])
    lk.update(x1, a1)
    torch.testing.assert_close(lk.mean_FD[0], torch.tensor([2.0, 1.0]))  # first: the batch's mean input
    torch.testing.assert_close(lk.mean_FD[1], torch.tensor([3.0, 2.0]))
    assert lk.valid_F.tolist() == [True, True, False]
    x2 = torch.tensor([[10.0, 10.0]])
    lk.update(x2, torch.tensor([[True, False, True]]))
    torch.testing.assert_close(lk.mean_FD[0], 0.9 * torch.tensor([2.0, 1.0]) + 0.1 * torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(lk.mean_FD[1], torch.tensor([3.0, 2.0]))  # not active: unchanged
    torch.testing.assert_close(lk.mean_FD[2], torch.tensor([10.0, 10.0]))  # first activation
    assert lk.count_F.tolist() == [3, 1, 1]


def test_lookup_running_mean_is_the_mean_of_all_activating_inputs():
    g = torch.Generator().manual_seed(3)
    lk = S.LNLookup.empty(5, 4, rule="mean")
    xs, acts = [], []
    for _ in range(6):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        a = torch.rand(8, 5, generator=g) < 0.4
        lk.mean_FD = lk.mean_FD.double()
        lk.update(x, a)
        xs.append(x)
        acts.append(a)
    X, A = torch.cat(xs), torch.cat(acts)
    for j in range(5):
        if A[:, j].any():
            torch.testing.assert_close(lk.mean_FD[j], X[A[:, j]].mean(dim=0))


# --- the SAE ------------------------------------------------------------------------------------

def _identity_weights(d: int, b_dec: float = -1.0, architecture: str = "standard", k: int | None = None):
    cfg = {"hook_name": "blocks.1.mlp.hook_post", "architecture": architecture}
    if k is not None:
        cfg["k"] = k
    return SAEWeights(W_enc=torch.eye(d), b_enc=torch.zeros(d), W_dec=torch.eye(d), b_dec=torch.full((d,), b_dec),
                      cfg=cfg)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 6)])
def test_identity_sae_reconstructs_perfectly(architecture, k):
    x = torch.rand(50, 6) * 3 - 0.5  # >= -0.5 > b_dec: every encoder input is positive
    w = _identity_weights(6, architecture=architecture, k=k)
    torch.testing.assert_close(w.decode(w.encode(x)), x)
    m = S.reconstruction_metrics(w, lambda: iter([x[:20], x[20:]]))
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-6) and m["mse"] == pytest.approx(0.0, abs=1e-10)
    assert m["l0"] == 6 and m["dead_fraction"] == 0
    sae = S.SparseAutoencoder(6, 6, architecture, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(6)), sae.W_dec.copy_(torch.eye(6)), sae.b_enc.zero_(), sae.b_dec.fill_(-1.0)
    torch.testing.assert_close(sae(x)[2], x)


def test_reconstruction_metrics_match_direct_numpy():
    g = torch.Generator().manual_seed(4)
    D, F = 5, 8
    w = SAEWeights(W_enc=torch.randn(D, F, generator=g), b_enc=torch.randn(F, generator=g) - 0.5,
                   W_dec=torch.randn(F, D, generator=g), b_dec=torch.randn(D, generator=g), cfg={"hook_name": "blocks.0.hook_resid_pre"})
    with torch.no_grad():
        w.b_enc[2] = -1e6  # dead
        w.b_enc[5] = 1e6  # dense
    x = torch.randn(40, D, generator=g)
    m = S.reconstruction_metrics(w, lambda: iter([x[:25], x[25:]]))
    X = x.double().numpy()
    f = np.maximum((X - w.b_dec.double().numpy()) @ w.W_enc.double().numpy() + w.b_enc.double().numpy(), 0)
    xh = f @ w.W_dec.double().numpy() + w.b_dec.double().numpy()
    assert m["mse"] == pytest.approx(((xh - X) ** 2).mean(), rel=1e-4)
    assert m["explained_variance"] == pytest.approx(1 - ((xh - X) ** 2).sum() / ((X - X.mean(0)) ** 2).sum(), rel=1e-4)
    active = f > 0
    assert m["l0"] == pytest.approx(active.sum(1).mean())
    assert m["dead_fraction"] == pytest.approx((~active.any(0)).mean())
    assert m["dense_fraction"] == pytest.approx((active.mean(0) > S.DENSE_THRESHOLD).mean())
    u = torch.from_numpy(X - w.b_dec.double().numpy())
    hbar = torch.stack([x.double()[active[:, j]].mean(0) if active[:, j].any() else torch.zeros(D, dtype=torch.float64)
                        for j in range(F)]) - w.b_dec.double()
    ref = S.ln_loss_reference(u, hbar, w.W_enc.double(), torch.from_numpy(active))
    assert m["l_n"] == pytest.approx(float(ref) / active.sum(), rel=1e-4)


def _blobs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g)
    return (centres[torch.randint(0, 6, (n,), generator=g)] + 0.1 * torch.randn(n, d, generator=g)).relu()


def _stream(x: torch.Tensor, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield x[torch.randint(0, len(x), (batch,), generator=g)]


@pytest.mark.parametrize("ln_coef,topk", [(0.0, None), (1e-3, None), (1e-3, 4)])
def test_training_keeps_decoder_rows_unit_norm_and_learns(ln_coef, topk):
    x = _blobs(2048, 16, 0)
    s = S.SAETrainSettings(expansion=2, steps=150, batch_size=128, l1=0.5, ln_coef=ln_coef, lr=3e-3, resample_every=0,
                           architecture="topk" if topk else "standard", topk=topk)
    sae, state = S.train_sae(_stream(x, 128), 16, s)
    if topk:
        assert all(h["l0"] <= topk for h in state.history)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32), rtol=0, atol=1e-5)
    assert state.history[-1]["mse"] < 0.3 * state.history[0]["mse"]
    assert (state.last_l_n is not None) == (ln_coef > 0)
    assert not any(p is state.lookup for p in sae.parameters())


def test_parallel_gradient_component_removed():
    sae = S.SparseAutoencoder(8, 12)
    x = torch.rand(32, 8)
    S.sae_loss(sae, x, 1.0)[0].backward()
    sae.remove_parallel_grad()
    dots = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros(12), atol=1e-6, rtol=0)


def test_resampling_revives_features_that_never_fire():
    x = _blobs(1024, 16, 1) * 3
    sae = S.SparseAutoencoder(16, 32, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    S.sae_loss(sae, x[:64], 1.0)[0].backward()
    opt.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e4
    assert not (sae(x)[1][:, dead] > 0).any()
    revived = S.resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(0))
    assert sorted(revived.tolist()) == dead.nonzero().squeeze(1).tolist()
    fires = (sae(x)[1] > 0).any(dim=0)
    assert fires[dead].all()
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(int(dead.sum())))
    assert (opt.state[sae.W_dec]["exp_avg"][dead] == 0).all() and (opt.state[sae.b_enc]["exp_avg_sq"][dead] == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][~dead] != 0).any()


def test_settings_refuse_bad_options():
    for kw in (dict(ln_momentum=1.0), dict(ln_update="median"), dict(architecture="gated"), dict(architecture="topk"),
               dict(steps=0), dict(l1=-1.0), dict(topk=3)):
        with pytest.raises(UserError):
            S.SAETrainSettings(**kw)


# --- SAELens layout -----------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    w = SAEWeights(W_enc=torch.randn(6, 10, generator=g), b_enc=torch.randn(10, generator=g), W_dec=torch.randn(10, 6, generator=g),
                   b_dec=torch.randn(6, generator=g), cfg={"hook_name": "blocks.2.mlp.hook_post", "model_name": "m",
                                                          "architecture": "topk", "k": 3, "context_size": 32})
    save_sae(tmp_path / "sae", w)
    v = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(v, name), getattr(w, name))
    assert (v.hook_name, v.layer, v.architecture, v.topk, v.model_name, v.d_in, v.d_sae) == \
        ("blocks.2.mlp.hook_post", 2, "topk", 3, "m", 6, 10)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # both SAELens generations' keys: top-level (pre-6) and the metadata block (6.x)
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.2.mlp.hook_post"
    assert cfg["hook_layer"] == cfg["metadata"]["hook_layer"] == 2
    assert cfg["activation_fn_kwargs"] == {"k": 3} and cfg["d_in"] == 6 and cfg["d_sae"] == 10
    x = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(v.encode(x), w.encode(x))
    assert ((v.encode(x) > 0).sum(dim=1) <= 3).all()


def _write_by_hand(path, tensors: dict, cfg: dict):
    path.mkdir()
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("style", ["pre6", "v6"])
def test_load_directory_written_by_hand_in_saelens_layout(tmp_path, style):
    g = torch.Generator().manual_seed(6)
    t = {"W_enc": torch.randn(4, 7, generator=g), "b_enc": torch.randn(7, generator=g),
         "W_dec": torch.randn(7, 4, generator=g), "b_dec": torch.randn(4, generator=g)}
    if style == "pre6":
        cfg = {"architecture": "standard", "d_in": 4, "d_sae": 7, "hook_name": "blocks.1.hook_resid_pre", "hook_layer": 1,
               "model_name": "gpt2", "context_size": 128, "dataset_path": "x", "normalize_activations": "none",
               "dtype": "float32", "device": "cpu", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
               "apply_b_dec_to_input": False}
        cfg["architecture"] = "topk"
    else:
        cfg = {"architecture": "topk", "d_in": 4, "d_sae": 7, "k": 2, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": False, "normalize_activations": "none",
               "metadata": {"hook_name": "blocks.1.hook_resid_pre", "model_name": "gpt2", "sae_lens_version": "6.5.0"}}
    _write_by_hand(tmp_path / "sae", {k: v.to(torch.bfloat16) if k == "W_dec" else v for k, v in t.items()}, cfg)
    w = load_sae(tmp_path / "sae")
    assert (w.hook_name, w.layer, w.architecture, w.topk, w.apply_b_dec_to_input, w.model_name) == \
        ("blocks.1.hook_resid_pre", 1, "topk", 2, False, "gpt2")
    assert w.W_dec.dtype == torch.float32
    x = torch.randn(3, 4, generator=g)
    pre = x @ t["W_enc"] + t["b_enc"]  # no b_dec subtraction for this SAE
    torch.testing.assert_close(w.pre_activation(x), pre)
    f = w.encode(x)
    top2 = pre.relu().topk(2, dim=1)
    torch.testing.assert_close(f.gather(1, top2.indices), top2.values)
    assert ((f > 0).sum(dim=1) <= 2).all()


def test_load_errors_are_one_line(tmp_path):
    t = {"W_enc": torch.zeros(4, 7), "b_enc": torch.zeros(6), "W_dec": torch.zeros(7, 4), "b_dec": torch.zeros(4)}
    _write_by_hand(tmp_path / "bad", t, {"hook_name": "blocks.0.hook_resid_pre"})
    cases = {tmp_path / "missing": "no such directory", tmp_path / "bad": "b_enc has shape (6,)"}
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "empty"] = "missing cfg.json"
    for path, words in cases.items():
        with pytest.raises(UserError) as e:
            load_sae(path)
        assert words in str(e.value) and "\n" not in str(e.value)


# --- the activation cache -----------------------------------------------------------------------

def _index_cache(path, n_seq: int, ctx: int, d: int = 3) -> ActivationCache:
    """A cache whose row r holds r in every column (float32), with small chunks."""
    import neuron_embeddings.storage.activations as A

    old = A.CHUNK_BYTES
    A.CHUNK_BYTES = 5 * ctx * d * 4  # 5 sequences per chunk
    try:
        w = CacheWriter(path, {"test": 1}, n_seq, ctx, d, "float32")
    finally:
        A.CHUNK_BYTES = old
    rows = np.repeat(np.arange(n_seq * ctx, dtype=np.float32)[:, None], d, axis=1)
    for i in range(0, len(rows), 37):  # appends that do not match chunks
        w.append(rows[i:i + 37])
    w.write_tokens(np.zeros((n_seq, ctx), dtype=np.int32))
    return w.finish()


def test_shuffled_reader_returns_every_row_once_per_epoch(tmp_path):
    cache = _index_cache(tmp_path / "c.zarr", n_seq=23, ctx=4)
    assert cache.chunk_rows == 20 and cache.n_rows == 92
    reader = ShuffledBatches(cache, batch_size=7, rows=(8, 88), seed=3, buffer_chunks=2, prefetch=1)
    orders = []
    for epoch in range(2):
        batches = list(reader.epoch(epoch))
        assert all(len(b) == 7 for b in batches[:-1])
        seen = torch.cat(batches)[:, 0].long()
        assert sorted(seen.tolist()) == list(range(8, 88))
        orders.append(seen.tolist())
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    stream = reader.stream()
    got = torch.cat([next(stream) for _ in range(40)])[:, 0].long()  # 280 rows: 3.5 epochs, full batches
    counts = torch.bincount(got - 8, minlength=80)
    assert counts.min() >= 3 and counts.max() <= 4
    assert torch.equal(torch.cat(list(reader.sequential()))[:, 0].long(), torch.arange(8, 88))


def test_activation_cache_matches_an_independent_forward(tmp_path, tiny_gpt2):
    from neuron_embeddings.core.datasets import iter_documents, pack_tokens
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.tasks.sae import cache_activations

    rec = cache_activations(str(tmp_path / "a.zarr"), tiny_gpt2, "builtin:python-docs", 1, "post", 6, 16,
                            batch_size=4, device="cpu", dtype="float32", progress=False)
    assert rec["rows"] == 96 and rec["d_in"] == 256 and not rec["reused"]
    cache = ActivationCache(tmp_path / "a.zarr")
    lm = load_model(tiny_gpt2, "cpu")
    tokens = pack_tokens(iter_documents("builtin:python-docs"), lm.tokenizer, 6, 16)
    assert np.array_equal(cache.tokens(), tokens)
    with torch.inference_mode():
        _, c = lm.bridge.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter="blocks.1.mlp.hook_post")
    np.testing.assert_allclose(cache.read(0, 96), c["blocks.1.mlp.hook_post"].reshape(96, 256).numpy(), rtol=1e-5, atol=1e-6)
    again = cache_activations(str(tmp_path / "a.zarr"), tiny_gpt2, "builtin:python-docs", 1, "post", 6, 16,
                              batch_size=4, device="cpu", dtype="float32", progress=False)
    assert again["reused"]
    with pytest.raises(UserError, match="other settings"):
        cache_activations(str(tmp_path / "a.zarr"), tiny_gpt2, "builtin:python-docs", 0, "post", 6, 16,
                          device="cpu", dtype="float32", progress=False)


def test_identity_splice_keeps_next_token_loss(tiny_gpt2):
    from neuron_embeddings.core.datasets import iter_documents, pack_tokens
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.tasks.sae import is_causal_lm, lm_loss_metrics

    lm = load_model(tiny_gpt2, "cpu")
    tokens = pack_tokens(iter_documents("builtin:python-docs"), lm.tokenizer, 4, 16)
    m = lm_loss_metrics(lm.bridge, _identity_weights(256), "blocks.1.mlp.hook_post", tokens)  # gelu >= -0.17 > b_dec
    assert is_causal_lm(lm.bridge)
    assert m["lm_loss_sae"] == pytest.approx(m["lm_loss_clean"], abs=1e-5)
    assert abs(m["lm_loss_zero"] - m["lm_loss_clean"]) > 1e-4 and m["loss_recovered"] == pytest.approx(1.0, abs=1e-2)


# --- end to end -----------------------------------------------------------------------------------

def test_sae_train_cli_end_to_end(tmp_path, tiny_gpt2, capsys):
    out = tmp_path / "sae"
    args = ["sae", "train", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--layer", "1", "--out", str(out),
            "--n-sequences", "20", "--ctx-len", "16", "--steps", "60", "--batch-size", "64", "--expansion", "1",
            "--l1", "1", "--ln-coef", "1e-3", "--ln-start", "10", "--device", "cpu"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("explained_variance", "mse", "l0", "dead_fraction", "dense_fraction", "l_n", "delta_lm_loss",
                "lm_loss_clean", "lm_loss_sae", "l_n_train_last"):
        assert m[key] is not None, key
    assert 0 < m["l0"] <= 256 and m["explained_variance"] > 0 and m["n_tokens"] == 2 * 16
    w = load_sae(out)
    assert (w.d_in, w.d_sae, w.hook_name, w.layer) == (256, 256, "blocks.1.mlp.hook_post", 1)
    torch.testing.assert_close(w.W_dec.norm(dim=1), torch.ones(256))
    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(args) == 0  # complete with the same settings: nothing retrained
    assert (out / "sae_weights.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main([*args[:-4], "--l1", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and err.count("\n") == 1
    assert (out / "sae_weights.safetensors").read_bytes() == before


@pytest.mark.parametrize("bad,words", [(["--layer", "7"], "out of range"), (["--ln-update", "median"], "--ln-update"),
                                       (["--hook", "resid"], "--hook"), (["--architecture", "topk"], "--topk")])
def test_sae_train_cli_bad_options(tmp_path, tiny_gpt2, capsys, bad, words):
    args = ["sae", "train", "--model", tiny_gpt2, "--dataset", "builtin:python-docs", "--layer", "1",
            "--out", str(tmp_path / "s"), "--n-sequences", "4", "--ctx-len", "8", "--steps", "2", "--device", "cpu"]
    assert main(args + bad) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("error:") and err.count("\n") == 1
