"""Explorer on a GPT-2-small-sized store: how long a neuron page takes, against reading its chunks.

Synthesises the store with the pipeline's own template (`create_store`), random data of the real
shapes: 12 layers x 3072 neurons, k = 50, d_model 768, float16 embeddings (2.8 GB), 8192 x 128
tokens, window activations, and embeddings with cluster structure (1-20 clusters per neuron),
clustered by the real cluster stage (`cluster_shard`), centroids by the real `centroids` stage.
Similar clusters: random links by default (fast), or `--similar` runs the real `similar` stage
and reports its time (`--similar-shards N`: only N shards, projecting the whole stage).

Then, for `--pages` random neurons (each page rendered once, as a user opening it would), it
times (a) reading the page's chunks (`ExplorerData.read_neuron` + the examples' token rows) and
(b) the whole page through the app (HTTP request -> HTML, including those reads), and prints the
median and worst of each and their ratio. The page cache is warm (the store was just written).

    .venv/bin/python benchmarks/bench_explorer.py --out /work/scratch/explorer/gpt2-sized.zarr
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuron_embeddings.core.plan import neuron_shards  # noqa: E402
from neuron_embeddings.core.settings import RunSettings  # noqa: E402
from neuron_embeddings.storage import schema  # noqa: E402
from neuron_embeddings.storage import store as st  # noqa: E402

L, M, K, D, S, T, VOCAB = 12, 3072, 50, 768, 8192, 128, 50257


def synth_shard(rng: np.random.Generator, n: int, before: int, after: int):
    """Random top-k tables of n neurons with cluster-structured embeddings."""
    act = -np.sort(-rng.gamma(2.0, 1.0, (n, K)).astype(np.float32), axis=1) + 0.1
    seq = np.stack([rng.choice(S, K, replace=False) for _ in range(n)]).astype(np.int32)
    pos = rng.integers(0, T, (n, K)).astype(np.int32)
    n_c = np.minimum(rng.geometric(0.12, n), 20)
    centers = rng.standard_normal((n, 20, D)).astype(np.float32)
    assign = (rng.random((n, K)) ** 1.5 * n_c[:, None]).astype(int)  # uneven cluster sizes
    emb = centers[np.arange(n)[:, None], assign] + 0.45 * rng.standard_normal((n, K, D)).astype(np.float32)
    W = before + 1 + after
    win = (act[:, :, None] * rng.random((n, K, W)).astype(np.float32)).astype(np.float32)
    win[:, :, before] = act
    idx = pos[:, :, None] - before + np.arange(W)
    win[(idx < 0) | (idx >= T)] = np.nan
    return act, seq, pos, emb.astype(np.float16), win


def build(out: str, similar: bool, similar_shards: int | None = None, seed: int = 0) -> None:
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from neuron_embeddings.core.cluster import cluster_shard
    from neuron_embeddings.tasks.centroids import centroid_shard

    settings = RunSettings(model="synthetic-gpt2-small-shape", dataset="random", layers=tuple(range(L)),
                           n_sequences=S, ctx_len=T, k=K, shard_size=256, embedding_dtype="float16")
    info = {"d_mlp": M, "d_model": D, "unit": "mlp-neuron", "weights": "random"}
    store = st.create_store(out, settings, info, VOCAB)
    rng = np.random.default_rng(seed)
    st.write(store, schema.TOKENS, (slice(None), slice(None)), rng.integers(0, VOCAB, (S, T)).astype(np.int32))
    st.write(store, schema.VOCAB, (slice(None),), np.array([f" w{i}" for i in range(VOCAB)]))
    st.Store(out).mark_complete("prepare", "all", {})
    before, after = st.window(store)
    shards = neuron_shards(settings, M)
    for sh in tqdm(shards, desc="synthesise + cluster + centroids"):
        region = (sh.row, slice(sh.start, sh.stop))
        act, seq, pos, emb, win = synth_shard(rng, sh.stop - sh.start, before, after)
        st.write_topk(store, region, act, seq, pos, win, emb)
        with threadpool_limits(limits=1, user_api="blas"):  # as the cluster stage runs it
            res = cluster_shard(emb, act, "average", 0.5)
        st.write_clusters(store, region, res.labels, res.linkage, {m: getattr(res, m) for m in schema.METRICS})
        for stage in ("embed", "cluster"):
            store.mark_complete(stage, sh.id, {})
        centroid_shard.fn(out, {**sh.__dict__, "id": sh.id}, "cpu")
    nc = st.read_metrics(store, ("n_clusters",))["n_clusters"]
    print(f"clusters: {int(nc.sum())} ({nc.mean():.2f} per neuron)")
    if similar:
        time_similar(out, similar_shards)
    random_links(store, rng)


def random_links(store, rng: np.random.Generator) -> None:
    """Random similar-cluster links for the shards without real ones: a page reads and shows
    them the same way."""
    for sh in neuron_shards(store.settings(), M):
        if store.is_complete("similar", sh.id):
            continue
        n = sh.stop - sh.start
        nb = np.stack([rng.integers(0, L, (n, K, 5)), rng.integers(0, M, (n, K, 5)), rng.integers(0, 3, (n, K, 5))], -1)
        st.write_similar(store, (sh.row, slice(sh.start, sh.stop)), nb.astype(np.int32),
                         -np.sort(-rng.random((n, K, 5)), axis=-1).astype(np.float32))
        store.mark_complete("similar", sh.id, {})


def time_similar(out: str, n_shards: int | None = None) -> None:
    """Run the real similar stage over every shard (or the first n_shards, projecting the whole
    stage from their median), in this process (one worker), and time it."""
    from tqdm import tqdm

    from neuron_embeddings.core.similar import cluster_sizes, search_dtype
    from neuron_embeddings.tasks.similar import similar_shard

    store = st.Store(out)
    shards = neuron_shards(store.settings(), M)
    sizes = cluster_sizes(st.read(store, schema.LABELS).reshape(L * M, K))
    print(f"similar: {int((sizes >= 2).sum())} clusters of >= 2 examples; search dtype {search_dtype('cpu')}")
    run = shards[:n_shards] if n_shards else shards
    for sh in run:
        store.clear_marker("similar", sh.id)
    t0 = time.perf_counter()
    secs = []
    for sh in tqdm(run, desc="similar (real stage)"):
        secs.append(similar_shard.fn(out, {**sh.__dict__, "id": sh.id}, "cpu")["seconds"])
    med = statistics.median(secs[1:] or secs)
    print(f"similar stage: {time.perf_counter() - t0:.1f} s for {len(run)} of {len(shards)} shards (first shard "
          f"{secs[0]:.1f} s, including reading every centroid; then median {med:.2f} s per shard); "
          f"whole stage on one worker: {secs[0] + med * (len(shards) - 1):.0f} s"
          + (" (projected)" if len(run) < len(shards) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/work/scratch/explorer/gpt2-sized.zarr")
    ap.add_argument("--pages", type=int, default=30)
    ap.add_argument("--similar", action="store_true", help="run the real similar stage (slow on CPU)")
    ap.add_argument("--similar-shards", type=int, default=None,
                    help="with --similar: time only this many shards and project the whole stage")
    ap.add_argument("--rebuild", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if a.rebuild or not st.Store(a.out).is_complete("centroids", neuron_shards(
            RunSettings(model="x", dataset="x", layers=tuple(range(L)), shard_size=256), M)[-1].id):
        import shutil

        shutil.rmtree(a.out, ignore_errors=True)
        t0 = time.perf_counter()
        build(a.out, a.similar, a.similar_shards)
        print(f"store built in {time.perf_counter() - t0:.0f} s: {a.out}")
    elif a.similar:
        time_similar(a.out, a.similar_shards)
    random_links(st.Store(a.out), np.random.default_rng(2))

    from fastapi.testclient import TestClient

    from neuron_embeddings.explorer.app import create_app
    from neuron_embeddings.explorer.data import ExplorerData

    t0 = time.perf_counter()
    data = ExplorerData(a.out)
    client = TestClient(create_app(data))
    _ = data.metrics, data.vocab, data.top_tokens, data._tokens
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert client.get("/").status_code == 200
    t_overview = time.perf_counter() - t0

    t0 = time.perf_counter()
    assert client.get(f"/neuron/{L - 1}/{M - 1}").status_code == 200
    t_first = time.perf_counter() - t0  # includes compiling the page's template

    rng = np.random.default_rng(1)
    reads, pages, sizes = [], [], []
    for _ in range(a.pages):
        layer, j = int(rng.integers(L)), int(rng.integers(M))
        t0 = time.perf_counter()
        arrays = data.read_neuron(layer, j)
        data.token_rows(arrays[schema.TOPK_SEQ])
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = client.get(f"/neuron/{layer}/{j}")
        pages.append(time.perf_counter() - t0)
        assert r.status_code == 200
        sizes.append(len(r.content))
    med_r, med_p = statistics.median(reads), statistics.median(pages)
    print(f"open (metrics, vocab, token index, tokens): {t_open:.2f} s; overview page (first): {t_overview:.2f} s; "
          f"first neuron page (compiles its template): {t_first:.2f} s")
    print(f"neuron page, {a.pages} random neurons (mean {np.mean(data.metrics['n_clusters']):.1f} clusters; "
          f"HTML {np.median(sizes) / 1024:.0f} KiB median):")
    print(f"  reading its chunks: median {1000 * med_r:.1f} ms, max {1000 * max(reads):.1f} ms")
    print(f"  whole page (request -> HTML): median {1000 * med_p:.1f} ms, max {1000 * max(pages):.1f} ms "
          f"(target < 1000 ms)")
    print(f"  page / chunk reads: {med_p / med_r:.2f} (median)")


if __name__ == "__main__":
    main()
