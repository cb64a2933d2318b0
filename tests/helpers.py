"""Test helpers: run the pipeline's stages in-process (no Prefect), read stores, check the contract."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr

from neuron_embeddings.tasks.resolve import resolve_run
from neuron_embeddings.tasks.cluster import cluster_store_shard
from neuron_embeddings.tasks.embed import embed_shard
from neuron_embeddings.tasks.prepare import prepare_store
from neuron_embeddings.tasks.scan import maxima_block, scan_block
from neuron_embeddings.tasks.similar import centroid_shard, similar_shard

CONTRACT_ARRAYS = ["tokens", "vocab", "topk/act", "topk/seq", "topk/pos", "embeddings", "clusters/labels",
                   "clusters/linkage", "metrics/n_examples", "metrics/n_clusters", "metrics/max_distance",
                   "metrics/mean_distance", "metrics/mean_intra", "metrics/mean_inter"]


def options(model: str, **over) -> dict:
    base = dict(model=model, dataset="builtin:python-docs", layers=None, n_sequences=24, ctx_len=32, k=6,
                selection="top", shard_size=64, linkage="average", threshold=0.5, seed=0,
                embedding_dtype="float32", scan_blocks=1, device="cpu", workers=1)
    base.update(over)
    return base


def run_stages(out: str, batch_size: int = 8, **opts) -> zarr.Group:
    """Every stage of the pipeline in plan order, by calling the task functions directly."""
    settings, lm = resolve_run(out, **opts)
    plan = prepare_store(out, settings, lm)
    if plan["band"]:
        for b in plan["blocks"]:
            maxima_block(out, b, batch_size, "cpu")
    for b in plan["blocks"]:
        scan_block(out, b, batch_size, "cpu")
    for sh in plan["shards"]:
        embed_shard(out, sh)
        cluster_store_shard(out, sh)
        centroid_shard(out, sh)
    for sh in plan["shards"]:
        similar_shard(out, sh)
    return zarr.open_group(out, mode="r")


def contract_arrays(out: str, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """The contract's arrays of a store (plus `extra` ones), read whole."""
    g = zarr.open_group(out, mode="r")
    return {name: g[name][...] for name in [*CONTRACT_ARRAYS, *extra]}


def assert_same_arrays(a: dict, b: dict) -> None:
    for name in a:
        if a[name].dtype.kind in "fc":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # NaN == NaN here
        else:
            assert np.array_equal(a[name], b[name]), name


def tree_digest(path: str) -> dict[str, str]:
    """Content hash of every file under a directory (to show nothing changed)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
