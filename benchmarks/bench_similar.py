#!/usr/bin/env python
"""Similar clusters: today's exact search against the HNSW graph (core.similar), side by side.

For each size (`--base` clusters x each of `--scales`), in one run:
- exact: `nearest_clusters` (blockwise matrix product in the search dtype `search_dtype` picks, as
  the stage runs it) for a sample of `--queries` clusters against all clusters; its cost is linear
  in the queries, so the whole search is projected as sample seconds x clusters / queries; run
  twice with each selection of the tiles' candidates (the compiled one, the CPU's default, and
  `torch.topk`), alternated three times: the ratio of their medians, and the share of neighbours
  they agree on;
- FAISS IndexFlatIP (exact, float32) for the same sample at the first size (the library's exact
  search, for comparison);
- hnsw: `HnswIndex` built over all clusters (one thread, as the stage builds it) and searched for
  the sample with each `--ef` (FAISS's threads; projected to all clusters like the exact search);
  recall@5 of its neighbours against the exact ones;
- ivf (`--ivf NLIST`): FAISS IVF-Flat, nprobe 8 to 128, the same way;
- the neighbour structure: median cosine of the 1st and 5th exact neighbour, against
  sqrt(2 ln N / d), about the largest cosine among N random unit vectors in d dimensions. Where the
  neighbours are barely above it, nothing in the data tells a search which clusters it may skip.

Clusters come from a store (`--store`: every cluster of >= 2 examples, as the stage reads them;
smaller sizes are random subsets of neurons) or are synthetic (`--synthetic`: bench_explorer's
GPT-2-small shape, 1-20 planted clusters per neuron with independent random centres in d 768, so
no cluster is much nearer than the rest: the hardest case for an approximate search).

    .venv/bin/python benchmarks/bench_similar.py --store smol.zarr --base 40000 --scales 1 2 4 --ef 192 384 768
    .venv/bin/python benchmarks/bench_similar.py --synthetic --base 240000 --scales 1 2 4 --hnsw-max 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from neuron_embeddings.core.similar import (HNSW_EF_CONSTRUCTION, HNSW_M, ClusterSet, HnswIndex,  # noqa: E402
                                            hnsw_ef_search, nearest_clusters, search_dtype)

N_SIMILAR = 5


def store_clusters(path: str) -> ClusterSet:
    from neuron_embeddings.core.plan import neuron_shards
    from neuron_embeddings.storage import store as st
    from neuron_embeddings.tasks.similar import _shard_clusters

    store = st.Store(path)
    d_mlp = int(store.attrs["d_mlp"])
    return ClusterSet.concat([_shard_clusters(store, sh, d_mlp, "cpu") for sh in neuron_shards(store.settings(), d_mlp)])


def synthetic_clusters(n: int, seed: int = 0, d: int = 768, k: int = 50) -> ClusterSet:
    """~n clusters of the bench_explorer generator's shape: per neuron min(geometric(0.12), 20)
    planted clusters; a centroid is its centre (random) plus the mean noise of its members."""
    rng = np.random.default_rng(seed)
    n_c = np.minimum(rng.geometric(0.12, n), 20)
    n_c = n_c[: np.searchsorted(np.cumsum(n_c), n) + 1]
    owner = np.repeat(np.arange(len(n_c)), n_c)[:n]
    size = rng.integers(2, 12, n)
    cent = rng.standard_normal((n, d), dtype=np.float32)
    cent /= np.sqrt(d)
    cent += (0.45 / np.sqrt(size))[:, None].astype(np.float32) * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)
    c = torch.from_numpy(cent).to(torch.float16)
    return ClusterSet(c, 1 / c.float().norm(dim=1), torch.from_numpy(owner), torch.from_numpy(np.arange(n)))


def subset(cs: ClusterSet, n: int, seed: int) -> ClusterSet:
    """About n clusters: those of a random subset of neurons (owners stay ascending)."""
    if n >= len(cs):
        return cs
    owners = torch.unique(cs.owner_N)
    keep = torch.from_numpy(np.random.default_rng(seed).permutation(len(owners))[: int(len(owners) * n / len(cs))])
    at = torch.nonzero(torch.isin(cs.owner_N, owners[keep.sort().values])).squeeze(1)
    return ClusterSet(cs.c_ND[at], cs.inv_N[at], cs.owner_N[at], cs.id_N[at])


def measure(cs: ClusterSet, n_queries: int, seed: int, faiss_flat: bool, efs: list[int] | None, hnsw_max: int,
            m: int, ef_construction: int, ivf: int) -> dict:
    N = len(cs)
    sample = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(N, min(n_queries, N), replace=False)))
    q = ClusterSet(cs.c_ND[sample], cs.inv_N[sample], cs.owner_N[sample], cs.id_N[sample])
    out = {"clusters": N, "d": cs.c_ND.shape[1], "queries": len(sample)}
    dt = search_dtype("cpu")
    with torch.inference_mode():
        t0 = time.perf_counter()
        refs = cs.searchable(dt)
        t_prep = time.perf_counter() - t0
        # the search with each selection (compiled, the CPU's default; torch.topk), alternated three
        # times after a warm-up of both (the kernel's compilation or cache load)
        secs: dict[bool, list[float]] = {True: [], False: []}
        for compiled in (True, False):
            nearest_clusters(q.rows(slice(0, 64)), [refs.rows(slice(0, 20000))], N_SIMILAR, search_dtype=dt, compiled=compiled)
        for compiled in (False, True) * 3:
            t0 = time.perf_counter()
            got = nearest_clusters(q, [refs], N_SIMILAR, search_dtype=dt, compiled=compiled)
            secs[compiled].append(time.perf_counter() - t0)
            if compiled:
                exact_id, exact_cos = got
            else:
                torch_id = got[0]
        t = t_prep + float(np.median(secs[True]))
        del refs
    out.update(selection_seconds={"compiled": [round(v, 2) for v in secs[True]],
                                  "torch_topk": [round(v, 2) for v in secs[False]]},
               compiled_over_torch=round(float(np.median(secs[True]) / np.median(secs[False])), 3),
               selections_agree=round(float((torch_id == exact_id).float().mean()), 5))
    # neighbour structure: the exact cosines of the 1st and 5th neighbour against the largest cosine
    # N random unit vectors in d would reach (~sqrt(2 ln N / d)): near it, no search can skip much
    out.update(exact_sample_s=round(t, 2), exact_projected_s=round(t * N / len(sample), 1),
               exact_dtype=str(dt).removeprefix("torch."), cos1=round(float(exact_cos[:, 0].nanmedian()), 3),
               cos5=round(float(exact_cos[:, -1].nanmedian()), 3),
               random_max_cos=round(float(np.sqrt(2 * np.log(N) / cs.c_ND.shape[1])), 3))
    if faiss_flat:
        import faiss
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(cs.c_ND.shape[1])
        for a in range(0, N, 65536):
            flat.add(np.ascontiguousarray(cs.unit(slice(a, a + 65536)).numpy()))
        flat.search(np.ascontiguousarray(q.unit().numpy()), N_SIMILAR + 30)
        t = time.perf_counter() - t0
        out.update(faiss_flat_sample_s=round(t, 2), faiss_flat_projected_s=round(t * N / len(sample), 1))
        del flat
    if ivf:
        out["ivf"] = ivf_flat(cs, q, exact_id, ivf, seed)
    if N > hnsw_max:
        return out
    t0 = time.perf_counter()
    index = HnswIndex(cs, m=m, ef_construction=ef_construction)
    out["hnsw_build_s"] = round(time.perf_counter() - t0, 1)
    out["hnsw_GB"] = round(index.nbytes / 1e9, 2)
    out["hnsw"] = []
    for ef in efs or [hnsw_ef_search(N)]:  # the search is linear in the queries: the sample's seconds, projected to all clusters
        with torch.inference_mode():
            t0 = time.perf_counter()
            got_id, _ = index.search(q, N_SIMILAR, ef_search=ef)
            t = time.perf_counter() - t0
        search_s = t * N / len(sample)
        out["hnsw"].append({"ef_search": ef, "search_projected_s": round(search_s, 1), "recall_at_5": recall_at_5(got_id, exact_id),
                            "hnsw_over_exact": round((out["hnsw_build_s"] + search_s) / out["exact_projected_s"], 3)})
    return out


def recall_at_5(got_id: torch.Tensor, exact_id: torch.Tensor) -> float:
    found = [len(set(g) & set(w) - {-1}) / max(1, len(set(w) - {-1})) for g, w in zip(got_id.tolist(), exact_id.tolist())]
    return round(float(np.mean(found)), 4)


def ivf_flat(cs: ClusterSet, q: ClusterSet, exact_id: torch.Tensor, nlist: int, seed: int) -> list[dict]:
    """FAISS IVF-Flat (inner product; k-means on a sample of 64 x nlist clusters, seeded): build
    seconds, and per nprobe the search seconds projected to all clusters and recall@5 (the
    candidates re-ranked by their exact cosines, the query's own neuron dropped, as the graph's)."""
    import faiss

    N, d = cs.c_ND.shape
    u = np.concatenate([cs.unit(slice(a, a + 65536)).numpy() for a in range(0, N, 65536)])
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed + 1234
    index.train(u[np.random.default_rng(seed + 1).choice(N, min(N, 64 * nlist), replace=False)])
    index.add(u)
    build = time.perf_counter() - t0
    m = N_SIMILAR + int(torch.unique_consecutive(cs.owner_N, return_counts=True)[1].max())
    qu, rows = q.unit(), []
    for nprobe in (8, 16, 32, 64, 128):
        index.nprobe = nprobe
        t0 = time.perf_counter()
        at = torch.from_numpy(index.search(np.ascontiguousarray(qu.numpy()), m)[1])
        t = time.perf_counter() - t0
        ok = (at >= 0) & (cs.owner_N[at.clamp_min(0)] != q.owner_N[:, None])
        cos = torch.where(ok, torch.einsum("qd,qmd->qm", qu, torch.from_numpy(u)[at.clamp_min(0)]), torch.tensor(-torch.inf))
        got = cs.id_N[at.clamp_min(0).gather(1, cos.topk(N_SIMILAR, dim=1).indices)]
        rows.append({"nlist": nlist, "nprobe": nprobe, "build_s": round(build, 1),
                     "search_projected_s": round(t * N / len(q), 1), "recall_at_5": recall_at_5(got, exact_id)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="a store whose centroids stage is complete (released centroids are recomputed)")
    src.add_argument("--synthetic", action="store_true")
    ap.add_argument("--base", type=int, default=60000, help="clusters at scale 1")
    ap.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--queries", type=int, default=3000, help="exact search: sample of query clusters")
    ap.add_argument("--ef", type=int, nargs="+", default=None,
                    help="HNSW efSearch values to compare (default: the stage's, hnsw_ef_search of the size)")
    ap.add_argument("--m", type=int, default=HNSW_M, help="HNSW links per node")
    ap.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    ap.add_argument("--ivf", type=int, default=0, help="also FAISS IVF-Flat with this many lists, nprobe 8-128")
    ap.add_argument("--hnsw-max", type=int, default=10**9, help="build no graph above this many clusters (exact only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    every = store_clusters(a.store) if a.store else synthetic_clusters(int(a.base * max(a.scales)), a.seed)
    print(f"{len(every)} clusters of d {every.c_ND.shape[1]} ({'store ' + a.store if a.store else 'synthetic'}), "
          f"read in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for i, s in enumerate(a.scales):
        r = {"scale": s, **measure(subset(every, int(a.base * s), a.seed), a.queries, a.seed, i == 0, a.ef, a.hnsw_max,
                                   a.m, a.ef_construction, a.ivf)}
        r["load_average"] = round(os.getloadavg()[0], 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| scale | clusters | cos 1st / 5th (random) | exact (today), s | efSearch | HNSW build + search, s | HNSW / exact | recall@5 | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['scale']:g}x | {r['clusters']:,} | {r['cos1']:.2f} / {r['cos5']:.2f} ({r['random_max_cos']:.2f}) | "
                f"{r['exact_projected_s']:.0f} |")
        for h in r.get("hnsw") or [None]:
            print(head + (" - | - | - | - |" if h is None else
                          f" {h['ef_search']} | {r['hnsw_build_s']:.0f} + {h['search_projected_s']:.0f} | "
                          f"{h['hnsw_over_exact']:.2f} | {h['recall_at_5']:.3f} |") + f" {r['load_average']} |")
    for r in rows:
        for v in r.get("ivf", []):
            print(f"IVF-Flat at {r['clusters']:,} clusters, {v['nlist']} lists, nprobe {v['nprobe']}: build {v['build_s']:.0f} s + "
                  f"search {v['search_projected_s']:.0f} s, recall@5 {v['recall_at_5']:.3f}")
    for r in rows:
        print(f"exact search at {r['clusters']:,} clusters, sample of {r['queries']:,}: compiled selection "
              f"{r['selection_seconds']['compiled']} s, torch.topk {r['selection_seconds']['torch_topk']} s: "
              f"{r['compiled_over_torch']:.3f}x; neighbours agree {r['selections_agree']:.5f}")
    if "faiss_flat_projected_s" in rows[0]:
        print(f"\nFAISS IndexFlatIP (exact, float32) at {rows[0]['clusters']:,} clusters: {rows[0]['faiss_flat_projected_s']:.0f} s "
              f"projected, against {rows[0]['exact_projected_s']:.0f} s for today's search ({rows[0]['exact_dtype']})")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
