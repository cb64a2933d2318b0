"""Tests for neuron_embeddings.core.synthetic: random GPT-2 and the planted-feature model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neuron_embeddings.core import synthetic
from neuron_embeddings.core.synthetic import (
    EOS,
    PlantedTruth,
    build_planted_model,
    build_random_gpt2,
    write_planted_corpus,
)

N_LAYER_PLANTED = 2


def _boot(model_dir: Path):
    """Load tokenizer + bridge the way the project does, with LayerNorm folding."""
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    tok = AutoTokenizer.from_pretrained(model_dir)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu", tokenizer=tok)
    bridge.enable_compatibility_mode(disable_warnings=True)
    return tok, bridge


def _mlp_cache(bridge, ids: torch.Tensor, layers: range) -> dict[str, torch.Tensor]:
    """{hook name: activation} for mlp.hook_in / mlp.hook_pre of ``layers`` on ``ids`` [batch, pos]."""
    cache: dict[str, torch.Tensor] = {}

    def save(t: torch.Tensor, hook) -> None:
        cache[hook.name] = t.detach().clone()

    names = [f"blocks.{layer}.mlp.{h}" for layer in layers for h in ("hook_in", "hook_pre")]
    with torch.no_grad():
        bridge.run_with_hooks(ids, fwd_hooks=[(n, save) for n in names])
    return cache


def _cosine_distances(e: torch.Tensor) -> torch.Tensor:
    """[n, n] cosine distances between the rows of e [n, d]."""
    en = e / e.norm(dim=-1, keepdim=True)
    return 1 - en @ en.T


# --------------------------------------------------------------------------- random GPT-2


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return build_random_gpt2(tmp_path_factory.mktemp("random") / "gpt2", seed=3)


def test_random_gpt2_has_nontrivial_layernorms(random_dir: Path) -> None:
    sd = load_file(random_dir / "model.safetensors")
    for name in ("transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"):
        w, b = sd[f"{name}.weight"], sd[f"{name}.bias"]
        assert not torch.allclose(w, torch.ones_like(w)), name
        assert w.min() >= 0.5 and w.max() <= 1.5 and w.std() > 0.1, name
        assert b.abs().max() > 0.01, name


def test_random_gpt2_tokenizer_round_trip(random_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_dir)
    text = "def f(x):\n    return x ** 2  # ünïcode"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == tok.bos_token == EOS
    assert tok(EOS)["input_ids"] == [tok.eos_token_id]
    assert len(tok) == 1000


def test_random_gpt2_folds_through_bridge(random_dir: Path) -> None:
    tok, bridge = _boot(random_dir)
    assert bridge.cfg.n_layers == 2 and bridge.cfg.d_model == 64 and bridge.cfg.d_vocab == len(tok)
    ids = torch.randint(0, len(tok), (3, 20), generator=torch.Generator().manual_seed(0))
    cache = _mlp_cache(bridge, ids, range(2))
    sd = load_file(random_dir / "model.safetensors")
    for layer in range(2):
        x = cache[f"blocks.{layer}.mlp.hook_in"]  # [batch, pos, d_model]
        pre = cache[f"blocks.{layer}.mlp.hook_pre"]  # [batch, pos, d_mlp]
        w_in, b_in = bridge.W_in[layer].detach(), bridge.b_in[layer].detach()
        torch.testing.assert_close(x @ w_in + b_in, pre, atol=1e-4, rtol=1e-4)
        # The LN gain really was folded: W_in differs from the stored c_fc weight.
        assert not torch.allclose(w_in, sd[f"transformer.h.{layer}.mlp.c_fc.weight"], atol=1e-2)


def test_random_gpt2_deterministic(tmp_path: Path, random_dir: Path) -> None:
    again = build_random_gpt2(tmp_path / "again", seed=3)
    other = build_random_gpt2(tmp_path / "other", seed=4)
    a, b, c = (load_file(d / "model.safetensors") for d in (random_dir, again, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (random_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


# --------------------------------------------------------------------------- planted model


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, PlantedTruth]:
    out = tmp_path_factory.mktemp("planted") / "model"
    truth = build_planted_model(out, n_layer=N_LAYER_PLANTED, seed=1)
    return out, truth


@pytest.fixture(scope="module")
def planted_bridge(planted):
    out, _ = planted
    return _boot(out)


@pytest.fixture(scope="module")
def planted_acts(planted, planted_bridge) -> tuple[PlantedTruth, object, dict[str, torch.Tensor]]:
    """The bridge and layer hooks with every vocabulary token once, each at position 0."""
    _, truth = planted
    tok, bridge = planted_bridge
    ids = torch.tensor(tok(" ".join(truth.words))["input_ids"])  # [vocab]
    assert ids.tolist() == list(range(len(truth.words)))
    return truth, bridge, _mlp_cache(bridge, ids[:, None], range(N_LAYER_PLANTED))


def test_planted_truth_shape(planted) -> None:
    _, truth = planted
    counts = truth.n_clusters()
    assert len(truth.neuron_features) == 32 and len(truth.features) == 6
    assert {1, 2, 3} <= set(counts.tolist()) and (counts == 0).any()
    assert truth.neuron_token_clusters(int(np.argmax(counts))) == [truth.features[f] for f in
                                                                   truth.neuron_features[int(np.argmax(counts))]]
    tf = truth.token_feature()
    assert tf.shape == (len(truth.words),) and tf[0] == -1 and truth.words[0] == EOS
    for f, ids in enumerate(truth.features):
        assert (tf[ids] == f).all() and len(ids) == 8
        assert len({truth.strengths[t] for t in ids}) == len(ids)  # distinct strengths
    assert (tf >= 0).sum() == 6 * 8


def _reads(truth: PlantedTruth) -> torch.Tensor:
    """[feature, neuron] bool: does the neuron read the feature."""
    out = torch.zeros(len(truth.features), len(truth.neuron_features), dtype=torch.bool)
    for j, fs in enumerate(truth.neuron_features):
        out[fs, j] = True
    return out


def test_planted_pre_activations(planted_acts) -> None:
    truth, _, cache = planted_acts
    tf = torch.as_tensor(truth.token_feature())
    reads = _reads(truth)
    planted_neuron = torch.as_tensor(truth.n_clusters() > 0)
    feature_tok = tf >= 0
    for layer in range(N_LAYER_PLANTED):
        pre = cache[f"blocks.{layer}.mlp.hook_pre"][:, 0]  # [vocab, d_mlp]
        should_fire = reads[tf[feature_tok]]  # [n_feature_tokens, d_mlp]
        assert (pre[feature_tok][should_fire] > 0.5).all()
        assert (pre[feature_tok][~should_fire] < -0.5).all()
        torch.testing.assert_close(pre[feature_tok][~should_fire & planted_neuron],
                                   torch.full_like(pre[feature_tok][~should_fire & planted_neuron], -1.0))
        assert (pre[~feature_tok] < -0.5).all()  # fillers and EOS fire nothing
        # Within a feature, stronger tokens activate a reading neuron more.
        for f, ids in enumerate(truth.features):
            for j in reads[f].nonzero()[:, 0].tolist():
                order = np.argsort([truth.strengths[t] for t in ids])
                assert (pre[ids][order, j].diff() > 0).all()
    torch.testing.assert_close(cache["blocks.0.mlp.hook_pre"], cache[f"blocks.{N_LAYER_PLANTED - 1}.mlp.hook_pre"],
                               atol=1e-4, rtol=1e-4)


def test_planted_activation_varies_with_position_not_sign(planted, planted_bridge) -> None:
    _, truth = planted
    _, bridge = planted_bridge
    token = truth.features[0][-1]
    j = int(_reads(truth)[0].nonzero()[0, 0])
    ids = torch.tensor([[token] * 32, [len(truth.words) - 1] * 32])  # a feature token, a filler
    pre = _mlp_cache(bridge, ids, range(1))["blocks.0.mlp.hook_pre"][:, :, j]  # [2, pos]
    assert (pre[0] > 0.5).all() and pre[0].std() > 0.01
    assert (pre[1] < -0.5).all()


def test_planted_embeddings_cluster_by_feature(planted_acts) -> None:
    truth, bridge, cache = planted_acts
    tf = truth.token_feature()
    x = cache["blocks.0.mlp.hook_in"][:, 0]  # [vocab, d_model]
    w_in = bridge.W_in[0].detach()  # [d_model, d_mlp]
    n_multi = 0
    for j, fs in enumerate(truth.neuron_features):
        if not fs:
            continue
        toks = [t for f in fs for t in truth.features[f]]
        dist = _cosine_distances(x[toks] * w_in[:, j])  # e = x ⊙ W_in[:, j]
        same = torch.as_tensor(tf[toks][:, None] == tf[toks][None, :])
        assert dist[same].max() < 0.2, j
        assert dist[same].max() > 1e-6, j  # the noise really tilts the embeddings
        if len(fs) > 1:
            n_multi += 1
            assert dist[~same].min() > 0.8, j
    assert n_multi >= 5


def test_planted_corpus_top_examples_recover_features(planted, planted_bridge, tmp_path: Path) -> None:
    """End to end: top-20 documents per neuron, embeddings at the max token, average linkage at 0.5."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    _, truth = planted
    tok, bridge = planted_bridge
    docs = write_planted_corpus(tmp_path / "c.txt", truth, seed=5).read_text().strip().split("\n\n")
    ids = tok(docs, return_tensors="pt")["input_ids"]  # [400, 16]
    cache = _mlp_cache(bridge, ids, range(1))
    x, pre = cache["blocks.0.mlp.hook_in"], cache["blocks.0.mlp.hook_pre"]  # [doc, pos, d], [doc, pos, d_mlp]
    w_in = bridge.W_in[0].detach()
    tf = truth.token_feature()
    for j, fs in enumerate(truth.neuron_features):
        if not fs:
            continue
        best, pos = pre[:, :, j].max(dim=1)  # [doc]
        top = best.topk(20).indices  # [20]
        labels_true = tf[ids[top, pos[top]].numpy()]
        assert sorted(set(labels_true.tolist())) == fs, j  # every feature shows up in the top examples
        e = (x[top, pos[top]] * w_in[:, j]).numpy()  # [20, d_model]
        labels = fcluster(linkage(pdist(e, "cosine"), "average"), t=0.5, criterion="distance")
        pairs_true = labels_true[:, None] == labels_true[None, :]
        np.testing.assert_array_equal(labels[:, None] == labels[None, :], pairs_true)


def test_planted_stored_layernorm_is_nontrivial(planted) -> None:
    out, _ = planted
    sd = load_file(out / "model.safetensors")
    w = sd["transformer.h.0.ln_2.weight"]
    assert not torch.allclose(w, torch.ones_like(w))
    assert torch.count_nonzero(sd["transformer.h.0.attn.c_proj.weight"]) == 0
    assert torch.count_nonzero(sd["transformer.h.0.mlp.c_proj.weight"]) == 0


def test_planted_truth_json_round_trip(planted, tmp_path: Path) -> None:
    out, truth = planted
    assert PlantedTruth.from_json(out) == truth
    assert PlantedTruth.from_json(out / synthetic.PLANTED_JSON) == truth
    path = truth.to_json(tmp_path / "t.json")
    again = PlantedTruth.from_json(path)
    assert again == truth
    np.testing.assert_array_equal(again.token_feature(), truth.token_feature())


def test_planted_corpus(planted, tmp_path: Path) -> None:
    _, truth = planted
    path = write_planted_corpus(tmp_path / "corpus.txt", truth, n_docs=50, doc_len=12, seed=2)
    docs = path.read_text().strip("\n").split("\n\n")
    assert len(docs) == 50
    vocab = set(truth.words) - {EOS}
    assert all(len(d.split()) == 12 and set(d.split()) <= vocab for d in docs)
    words = path.read_text().split()
    tf = truth.token_feature()
    index = {w: i for i, w in enumerate(truth.words)}
    frac_feature = np.mean([tf[index[w]] >= 0 for w in words])
    assert 0.35 < frac_feature < 0.65
    again = write_planted_corpus(tmp_path / "again.txt", truth, n_docs=50, doc_len=12, seed=2)
    assert again.read_text() == path.read_text()


def test_planted_deterministic(planted, tmp_path: Path) -> None:
    out, truth = planted
    again = build_planted_model(tmp_path / "again", n_layer=N_LAYER_PLANTED, seed=1)
    other = build_planted_model(tmp_path / "other", n_layer=N_LAYER_PLANTED, seed=2)
    a, b, c = (load_file(d / "model.safetensors") for d in (out, tmp_path / "again", tmp_path / "other"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert again == truth and other != truth


def test_shared_directions_overlap() -> None:
    rng = np.random.default_rng(0)
    dirs, v, _ = synthetic._feature_directions(5, 64, 0.3, rng)  # [5, 64]
    gram = dirs @ dirs.T
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)
    np.testing.assert_allclose(gram[~np.eye(5, dtype=bool)], 0.3, atol=1e-12)
    np.testing.assert_allclose(dirs.mean(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(dirs @ v, 0.0, atol=1e-12)


def test_planted_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_planted_model(tmp_path / "a", n_features=40, d_model=64)
    with pytest.raises(ValueError):
        build_planted_model(tmp_path / "b", d_model=66, n_head=4)
    with pytest.raises(ValueError):
        build_planted_model(tmp_path / "c", shared_directions=1.0)
