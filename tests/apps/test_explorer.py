"""The explorer's data access, plots, pages and token importance, on a store made by the pipeline."""
from __future__ import annotations

import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from fastapi.testclient import TestClient
from scipy.cluster import hierarchy
from zarr.storage import LocalStore, WrapperStore

from neuron_embeddings.cli import main
from neuron_embeddings.core.models import load_model
from neuron_embeddings.core.sae_io import load_sae
from neuron_embeddings.explorer.app import create_app
from neuron_embeddings.explorer.data import (Example, ExplorerData, Token, central_first, centrality, display_texts,
                                             distinct_windows, is_wordpiece)
from neuron_embeddings.explorer.plots import ABOVE, cluster_colour, dendrogram_svg, histogram_svg, node_labels
from tests.helpers import copy_store, marker_root, options, run_stages, state_dir


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("explore") / "s.zarr")
    run_stages(out, **options(tiny_gpt2, n_sequences=24, ctx_len=32, k=6))
    return out


@pytest.fixture(scope="module")
def data(store):
    return ExplorerData(store)


# --- pure helpers -----------------------------------------------------------------------------

def test_centrality_is_mean_cosine_to_the_others():
    e = np.random.default_rng(0).standard_normal((7, 5))
    e[3] = 0  # a zero vector: orthogonal to all
    u = e / np.where(np.linalg.norm(e, axis=1, keepdims=True) == 0, 1, np.linalg.norm(e, axis=1, keepdims=True))
    want = [np.mean([u[i] @ u[j] for j in range(7) if j != i]) for i in range(7)]
    np.testing.assert_allclose(centrality(e), want, atol=1e-12)
    order = central_first(np.array([10, 11, 12, 13, 14, 15, 16]), e)
    assert order[0] == 10 + int(np.argmax(want)) and sorted(order) == list(range(10, 17))
    assert order[1:] == [s for s in range(10, 17) if s != order[0]]  # the rest in slot order


def test_wordpiece_texts_read_as_running_text():
    assert "".join(display_texts(["key", "##error", "is", "raised"], True)) == "keyerror is raised"
    assert display_texts([" a", "b"], False) == [" a", "b"]


def test_wordpiece_pieces_join_as_the_text_was_written(minilm_path):
    """The real WordPiece tokenizer's pieces (from the store's vocab strings) read back as the text
    (BERT's own decode gives "don ' t", "e - mail")."""
    from transformers import AutoTokenizer

    from neuron_embeddings.core.datasets import vocab_strings

    tok = AutoTokenizer.from_pretrained(minilm_path)
    vocab = np.array(vocab_strings(tok))
    assert is_wordpiece(vocab)
    for text in ["don't raise a keyerror.", "it's foo's bar! we'll see", "(x, y) is a tuple; e-mail foo_bar/baz.",
                 "3.5% of 1,000 items: [a, b] {c}", "x = y + 1"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert "".join(display_texts([str(vocab[i]) for i in ids], True)) == text


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


def test_cluster_colours_stay_distinct_beyond_ten():
    colours = [cluster_colour(c) for c in range(50)]  # k = 50 examples: up to 50 clusters
    rgb = np.array([_rgb(c) for c in colours])
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)[np.triu_indices(50, 1)]
    assert gaps.min() >= 40  # of 441 in RGB: no two look alike (the old palette repeated after 10)
    assert np.linalg.norm(rgb - _rgb(ABOVE), axis=1).min() >= 40  # nor like the grey above the cut
    assert len({cluster_colour(c) for c in range(1000)}) == 1000 and cluster_colour(-1) == ABOVE


def test_dendrogram_colours_are_the_cluster_colours_beyond_ten():
    rng = np.random.default_rng(3)
    centres = np.eye(16)[:15]  # 15 orthogonal directions: 15 clusters of 3 examples
    x = np.repeat(centres, 3, axis=0) + 0.01 * rng.standard_normal((45, 16))
    Z = hierarchy.linkage(x, "average", metric="cosine")
    flat = hierarchy.fcluster(Z, 0.5, criterion="distance") - 1
    svg = dendrogram_svg(Z, flat, 0.5, [f"t{i}" for i in range(45)])
    leaves = re.findall(r'<rect [^>]*fill="(#[0-9a-f]{6})"><title>[^<]*: cluster (\d+)</title>', svg)
    assert len(leaves) == 45 and len({c for _, c in leaves}) == 15
    assert all(fill == cluster_colour(int(c)) for fill, c in leaves)
    links = set(re.findall(r'<polyline [^>]*stroke="(#[0-9a-f]{6})"', svg))
    assert links == {cluster_colour(c) for c in range(15)} | {ABOVE}  # each cluster's links in its colour


def test_identical_windows_are_shown_once_with_their_count():
    def ex(slot: int, words: list[str], at: int) -> Example:
        return Example(slot, 1.0, slot, at, [Token(w, 0.5, i == at) for i, w in enumerate(words)])

    a, b = ["the", " key", " error"], ["a", " key", " error"]
    got = distinct_windows([ex(0, a, 1), ex(1, b, 1), ex(2, a, 1), ex(3, a, 2), ex(4, a, 1)])
    assert [(e.slot, e.copies) for e in got] == [(0, [2, 4]), (1, []), (3, [])]  # same text, other max: distinct


def test_node_labels_agree_with_fcluster():
    x = np.random.default_rng(1).standard_normal((20, 4))
    Z = hierarchy.linkage(x, "average", metric="cosine")
    flat = hierarchy.fcluster(Z, 0.5, criterion="distance") - 1
    lab = node_labels(Z, flat, 0.5)
    assert np.array_equal(lab[:20], flat)
    for i, (a, b, d, _) in enumerate(Z):  # a merge below the cut joins leaves of one cluster
        if d <= 0.5:
            assert lab[20 + i] == lab[int(a)] == lab[int(b)] >= 0
        else:
            assert lab[20 + i] == -1
    svg = dendrogram_svg(Z, flat, 0.5, [f"t{i}" for i in range(20)])
    assert svg.count("<polyline") == 19 and svg.count('class="threshold"') == 1


def test_histogram_counts():
    svg = histogram_svg(np.array([1, 1, 2, 3, np.nan]), np.array([0.5, 1.5, 2.5, 3.5]), "c", "{:.1f}")
    assert re.findall(r"<title>[^<]*: (\d+)</title>", svg) == ["2", "1", "1"] and "n=4" in svg


# --- data access against the store ------------------------------------------------------------

class CountingStore(WrapperStore):
    """Records the keys read through it."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)


def test_neuron_page_reads_only_its_chunks(store):
    counting = CountingStore(LocalStore(store, read_only=True))
    d = ExplorerData(store, zarr_store=counting)
    _ = d.vocab, d.metrics, d.top_tokens  # read once per process (whole arrays), not per page
    counting.keys.clear()
    d.neuron(1, 70)  # row 1, shard of neurons 64-127 (shard size 64)
    chunks = {k for k in counting.keys if not k.endswith("zarr.json")}
    per_neuron = {"topk/act", "topk/seq", "topk/pos", "topk/window", "clusters/labels", "clusters/linkage",
                  "embeddings", "similar/neighbours", "similar/cosine", "logits/top_tokens", "logits/top_values",
                  "logits/bottom_tokens", "logits/bottom_values"}
    want = {f"{n}/c/1/1/" + "/".join(["0"] * (zarr.open_array(f"{store}/{n}").ndim - 2)) for n in per_neuron}
    assert chunks - {"tokens/c/0/0"} == want  # one chunk per array, the one holding the neuron
    assert "tokens/c/0/0" in chunks


def test_neuron_view_matches_the_store(data, store):
    g = zarr.open_group(store, mode="r")
    before, after = data.window
    tokens, vocab = g["tokens"][:], g["vocab"][:]
    seen_multi = 0
    for layer, j in [(0, 3), (1, 70), (1, 200)]:
        row = data.row_of(layer)
        v = data.neuron(layer, j)
        labels, emb = g["clusters/labels"][row, j], g["embeddings"][row, j]
        act, seq, pos, win = (g[n][row, j] for n in ("topk/act", "topk/seq", "topk/pos", "topk/window"))
        assert [c.label for c in v.clusters] == list(range(int(labels.max()) + 1))
        assert [c.size for c in v.clusters] == sorted((c.size for c in v.clusters), reverse=True)
        for c in v.clusters:
            slots = np.flatnonzero(labels == c.label)
            assert sorted(s for e in c.examples for s in [e.slot, *e.copies]) == slots.tolist()
            u = emb[slots] / np.linalg.norm(emb[slots], axis=1, keepdims=True)
            mean_cos = [(u[i] @ u.sum(0) - 1) / max(len(slots) - 1, 1) for i in range(len(slots))]
            first = int(np.flatnonzero(slots == c.examples[0].slot)[0])
            assert mean_cos[first] >= max(mean_cos) - 1e-6  # the most central first
            seen_multi += len(slots) > 1
            for e in c.examples:
                s, p = int(seq[e.slot]), int(pos[e.slot])
                lo, hi = max(0, p - before), min(tokens.shape[1], p + after + 1)
                assert "".join(t.text for t in e.tokens) == "".join(vocab[tokens[s, lo:hi]])
                maxes = [t for t in e.tokens if t.is_max]
                assert len(maxes) == 1 and maxes[0].act == pytest.approx(act[e.slot], rel=1e-6)
                np.testing.assert_array_equal([t.act for t in e.tokens], win[e.slot][lo - p + before:hi - p + before])
        assert len(v.leaf_slots) == v.metrics["n_examples"] and len(v.linkage) == max(len(v.leaf_slots) - 1, 0)
    assert seen_multi > 0


def test_similar_links_are_the_stored_neighbours(data, store):
    g = zarr.open_group(store, mode="r")
    nb = g["similar/neighbours"][:]
    r, j, c = np.argwhere(nb[..., 0, 0] >= 0)[0]
    v = data.neuron(data.layers[r], int(j))
    links = [(s.layer, s.neuron, s.cluster) for s in v.clusters[c].similar]
    assert links == [(data.layers[a], b, cc) for a, b, cc in nb[r, j, c] if a >= 0]


def test_search_lists_the_clusters_that_peak_on_the_token(data, store):
    g = zarr.open_group(store, mode="r")
    tokens, vocab = g["tokens"][:], g["vocab"][:]
    labels, seq, pos = g["clusters/labels"][:], g["topk/seq"][:], g["topk/pos"][:]
    tok, _ = data.top_tokens
    query = str(vocab[Counter(tok[tok >= 0].tolist()).most_common(1)[0][0]])
    _, hits = data.search(query, limit=10**6)
    want = set()
    for r, j, c in zip(*np.nonzero(labels.max(axis=2, keepdims=True) >= np.arange(labels.shape[2]))):
        slots = np.flatnonzero(labels[r, j] == c)  # in slot order: most activating first
        # the cluster's token: the token id its examples most often peak on, ties to the earliest example
        ids = [int(tokens[seq[r, j, s], pos[r, j, s]]) for s in slots]
        counts = Counter(ids)
        first = next(t for t in ids if counts[t] == max(counts.values()))
        if str(vocab[first]).strip() == query.strip():
            want.add((data.layers[r], int(j), int(c)))
    got = {(h["layer"], h["neuron"], h["cluster"]) for h in hits}
    assert got == want and len(got) > 0
    assert [h["count"] for h in hits] == sorted((h["count"] for h in hits), reverse=True)


def test_token_index_without_the_similar_stage_is_computed_and_cached(store, data, tmp_path):
    copy = tmp_path / "copy.zarr"
    copy_store(store, copy)
    shutil.rmtree(marker_root(copy) / "centroids")  # as if the centroids stage had not run
    d = ExplorerData(str(copy))
    tok, cnt = d.top_tokens
    want_tok, want_cnt = data.top_tokens
    np.testing.assert_array_equal(tok, want_tok)
    np.testing.assert_array_equal(cnt, want_cnt)
    assert (state_dir(copy) / "explorer" / "top_tokens.npz").exists()
    again = ExplorerData(str(copy)).top_tokens  # read back from the cache
    np.testing.assert_array_equal(again[0], want_tok)


def test_similar_state_of_a_run_without_the_similar_stage(store, tmp_path):
    copy = tmp_path / "nosim.zarr"
    copy_store(store, copy)
    shutil.rmtree(marker_root(copy) / "similar")
    assert ExplorerData(str(copy)).neuron(0, 3).similar_state == "pending"  # not computed yet
    zarr.open_group(str(copy), mode="r+").attrs["similar"] = False  # as made with --no-similar
    v = ExplorerData(str(copy)).neuron(0, 3)
    assert v.similar_state == "off" and all(not c.similar for c in v.clusters)
    assert "--no-similar" in TestClient(create_app(ExplorerData(str(copy)))).get("/neuron/0/3").text


def test_navigation(data):
    last = (data.layers[-1], data.d_mlp - 1)
    assert data.step(*last, 1) == (data.layers[0], 0) and data.step(data.layers[0], 0, -1) == last
    assert data.step(data.layers[0], data.d_mlp - 1, 1) == (data.layers[1], 0)
    import random

    rng = random.Random(0)
    for _ in range(20):
        layer, j = data.random_neuron(rng)
        assert data.metrics["n_examples"][data.row_of(layer), j] >= 2


# --- pages --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(data):
    return TestClient(create_app(data))


def test_pages(client, data):
    home = client.get("/")
    assert home.status_code == 200 and home.text.count("<svg class=\"hist\"") == 2 * len(data.layers)
    first = re.search(r'<div id="most">.*?href="(/neuron/\d+/\d+)"', home.text, re.S).group(1)
    page = client.get(first)
    assert page.status_code == 200 and 'class="t max"' in page.text and "<svg class=\"dendrogram\"" in page.text
    assert client.get("/neuron", params={"layer": 1, "neuron": 5}, follow_redirects=False).headers["location"] == "/neuron/1/5"
    assert client.get("/random", follow_redirects=False).status_code == 303
    bad = client.get("/neuron/7/0")
    assert bad.status_code == 404 and "layer 7 is not in this store" in bad.text
    assert client.get(f"/neuron/0/{data.d_mlp}").status_code == 404
    assert client.get("/search", params={"token": "no-such-token-xyz"}).status_code == 200
    assert client.get("/importance/0/0/0").status_code == 404  # no --model


def test_neuron_page_shows_the_logit_effects_where_the_store_has_them(client, data, store, tmp_path):
    from markupsafe import escape

    from neuron_embeddings.explorer.app import show_token

    g = zarr.open_group(store, mode="r")
    page = client.get("/neuron/1/70").text
    for side in ("top", "bottom"):
        table = re.search(rf'id="logits-{side}">(.*?)</table>', page, re.S).group(1)
        shown = re.findall(r"<code>(.*?)</code></td><td>(.*?)</td>", table)
        want = g[f"logits/{side}_tokens"][1, 70]
        assert [t for t, _ in shown] == [str(escape(show_token(data.vocab[t]))) for t in want]
        np.testing.assert_allclose([float(x) for _, x in shown], g[f"logits/{side}_values"][1, 70], rtol=1e-2)
    copy = tmp_path / "nologits.zarr"
    copy_store(store, copy)
    shutil.rmtree(copy / "logits")  # a store made before the logits stage
    zarr.open_group(str(copy), mode="r+").attrs["logit_effects"] = False
    assert ExplorerData(str(copy)).neuron(1, 70).logits is None
    assert "logits-top" not in TestClient(create_app(ExplorerData(str(copy)))).get("/neuron/1/70").text


def test_a_window_seen_twice_is_shown_once_with_its_count(store, tmp_path):
    """The same passage in two sequences of the corpus: one line in the cluster, marked x2."""
    out = str(tmp_path / "dup.zarr")
    shutil.copytree(store, out)
    g = zarr.open_group(out, mode="r+")
    labels, seq, pos = (g[n][...] for n in ("clusters/labels", "topk/seq", "topk/pos"))
    row, j, c = next((r, j, int(c)) for r, j in zip(*np.nonzero(labels.max(axis=2) >= 0))
                     for c in np.unique(labels[r, j][labels[r, j] >= 0]) if (labels[r, j] == c).sum() >= 3)
    a, b = np.flatnonzero(labels[row, j] == c)[:2]
    tokens = g["tokens"][...]
    tokens[seq[row, j, b]] = tokens[seq[row, j, a]]  # example b's sequence now holds a's passage, at a's position
    g["tokens"][...] = tokens
    p = pos[row, j].copy()
    p[b] = p[a]
    g["topk/pos"][row, j] = p
    data = ExplorerData(out)
    page = TestClient(create_app(data)).get(f"/neuron/{data.layers[row]}/{j}").text
    section = re.search(rf'<section class="cluster" id="cluster-{c}".*?</section>', page, re.S).group(0)
    size = int((labels[row, j] == c).sum())
    assert len(re.findall(r'data-slot="(\d+)"', section)) == size - 1 and f"({size - 1} distinct windows)" in section
    badge = re.search(r'<span class="badge copies" title="([^"]*)">×2</span>', section)
    assert badge and f"slots {a}, {b}" in badge.group(1)


def test_explore_cli_refuses_a_non_store(capsys, tmp_path):
    assert main(["explore", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a neuron-embeddings store" in err[0]


# --- token importance -------------------------------------------------------------------------

def test_token_importance(store, data, tiny_gpt2):
    from neuron_embeddings.explorer.importance import ImportanceModel, replaced_batch
    from neuron_embeddings.core.models import HOOK_ACTIVATION

    model = ImportanceModel(tiny_gpt2, data.attrs, "cpu")
    client = TestClient(create_app(data, model))
    g = zarr.open_group(store, mode="r")
    act, seq, pos = g["topk/act"][1], g["topk/seq"][1], g["topk/pos"][1]
    j = int(np.argmax(np.where((pos[:, 0] > 3) & (pos[:, 0] < 28), act[:, 0], -np.inf)))
    page = client.get(f"/importance/1/{j}/0")
    assert page.status_code == 200 and 'class="t max"' in page.text
    r = client.app.state.explorer.cache.get(1, j, 0)
    assert r["original"] == pytest.approx(float(act[j, 0]), rel=1e-4, abs=1e-5)  # the scan's activation
    drops = dict(zip(r["positions"], r["drop"]))
    p0 = int(pos[j, 0])
    assert drops and max(drops) < p0  # causal: the page computes earlier tokens only ...
    row = g["tokens"][int(seq[j, 0])]
    assert model.importance(row, 1, j, p0, [p0 + 1, p0 + 2])["drop"] == [0, 0]  # ... later ones cannot matter
    earlier = [p for p in drops if p < p0]
    one = replaced_batch(row, [earlier[0]], model.replacement)[1:]  # an unbatched forward of one replacement
    with torch.inference_mode():
        _, cache = model.lm.bridge.run_with_cache(torch.from_numpy(one), names_filter=[HOOK_ACTIVATION.format(layer=1)])
    alone = float(cache[HOOK_ACTIVATION.format(layer=1)][0, p0, j])
    assert drops[earlier[0]] == pytest.approx(r["original"] - alone, abs=1e-4)
    assert (state_dir(store) / "explorer" / "importance.json").exists()  # cached on disk


# --- an SAE store -------------------------------------------------------------------------------

def test_sae_store_pages_and_importance(tiny_gpt2, tmp_path):
    from neuron_embeddings.explorer.importance import ImportanceModel
    from tests.apps.test_sae_evaluate import write_saelens_dir

    write_saelens_dir(tmp_path / "sae", 256, 48, "blocks.1.mlp.hook_post", 1)
    out = str(tmp_path / "sae.zarr")
    g = run_stages(out, **options(tiny_gpt2, sae=str(tmp_path / "sae"), k=5, shard_size=16, n_sequences=16))
    d = ExplorerData(out)
    assert d.unit_word == "feature" and d.layers == [1]
    client = TestClient(create_app(d, ImportanceModel(tiny_gpt2, d.attrs, "cpu")))
    home = client.get("/")
    assert "48 features in 1 layer" in home.text and "Most polysemantic features" in home.text
    j = int(np.argmax(g["metrics/n_examples"][0]))
    page = client.get(f"/neuron/1/{j}")
    assert page.status_code == 200 and "Layer 1 · Feature" in page.text and 'class="t max"' in page.text
    assert client.get(f"/importance/1/{j}/0").status_code == 200
    r = client.app.state.explorer.cache.get(1, j, 0)
    assert r["original"] == pytest.approx(float(g["topk/act"][0, j, 0]), rel=1e-4, abs=1e-5)  # the SAE's activation
    # an SAE on mlp.hook_post writes W_dec[j] @ W_out to the residual stream: its logit effects
    w_dec = load_sae(str(tmp_path / "sae")).W_dec.double().numpy()
    lm = load_model(tiny_gpt2, "cpu")
    effect = w_dec @ lm.bridge.W_out[1].detach().double().numpy() @ lm.bridge.W_U.detach().double().numpy()
    np.testing.assert_array_equal(g["logits/top_tokens"][0], np.argsort(-effect, 1)[:, :10])
    assert 'id="logits-bottom"' in page.text and "the decoder row" in page.text
