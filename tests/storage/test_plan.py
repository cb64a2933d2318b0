"""The plan: every task writes whole chunks, and no two tasks write the same chunk."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.core.plan import neuron_shards, scan_blocks
from neuron_embeddings.storage.store import create_store, shard_region


def _chunk_ids(region: tuple, chunks: tuple, shape: tuple) -> set:
    ranges = []
    for dim, sel in enumerate(region):
        if isinstance(sel, int):
            ranges.append([sel // chunks[dim]])
        else:
            start, stop = sel.start or 0, shape[dim] if sel.stop is None else sel.stop
            assert start % chunks[dim] == 0 and (stop % chunks[dim] == 0 or stop == shape[dim]), (region, chunks)
            ranges.append(range(start // chunks[dim], -(-stop // chunks[dim])))
    for dim in range(len(region), len(shape)):
        ranges.append(range(-(-shape[dim] // chunks[dim])))
    return set(itertools.product(*ranges))


@pytest.mark.parametrize("d_mlp,shard_size,blocks", [(256, 64, 1), (3072, 256, 4), (1536, 100, 3), (37, 7, 5),
                                                      (64, 1000, 2)])
def test_tasks_write_disjoint_whole_chunks(tmp_path, d_mlp, shard_size, blocks):
    s = RunSettings(model="m", dataset="d", layers=(0, 3, 5), n_sequences=40, ctx_len=8, k=5,
                    shard_size=shard_size, scan_blocks=blocks)
    store = create_store(str(tmp_path / "s.zarr"), s, {"d_mlp": d_mlp, "d_model": 16, "model": "m"}, d_vocab=10)
    g = store.group("r")
    shard_arrays = ["topk/act", "topk/seq", "topk/pos", "embeddings", "clusters/labels", "clusters/linkage",
                    "metrics/n_clusters", "weights/b_in"]
    shards = neuron_shards(s, d_mlp)
    covered = {name: set() for name in shard_arrays}
    for sh in shards:
        for name in shard_arrays:
            a = g[name]
            ids = _chunk_ids(shard_region(sh), a.chunks, a.shape)
            assert not ids & covered[name], f"{name}: shard {sh.id} writes a chunk another shard writes"
            covered[name] |= ids
    for name in shard_arrays:  # and together they cover the array
        a = g[name]
        assert covered[name] == _chunk_ids((), a.chunks, a.shape)
    seen = set()
    for b in scan_blocks(s):
        for row in range(len(s.layers)):
            ids = _chunk_ids((b.index, row), g["scan/x"].chunks, g["scan/x"].shape)
            assert not ids & seen
            seen |= ids
    # the blocks partition the sequences
    edges = [(b.start, b.stop) for b in scan_blocks(s)]
    assert edges[0][0] == 0 and edges[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))


def test_misaligned_write_is_refused(tmp_path):
    from neuron_embeddings.storage.store import write

    s = RunSettings(model="m", dataset="d", layers=(0,), n_sequences=8, ctx_len=8, k=5, shard_size=64)
    store = create_store(str(tmp_path / "s.zarr"), s, {"d_mlp": 256, "d_model": 16, "model": "m"}, d_vocab=10)
    with pytest.raises(AssertionError, match="chunk-aligned"):
        write(store, "topk/act", (0, slice(32, 96)), np.zeros((64, 5), np.float32))


@pytest.mark.parametrize("n,workers", [(144, 1), (144, 2), (144, 4), (144, 32), (8, 2), (3, 2), (1000, 7), (0, 2)])
def test_shard_batches_partition_the_shards_and_balance_the_workers(n, workers):
    """Each shard in exactly one batch (so no two batch tasks write the same chunk), in order;
    batches shrink, equal within a round of one per worker; on equal workers taking the next batch
    when free, the last worker finishes at most one final-round batch after the first."""
    import heapq

    from neuron_embeddings.tasks.shards import shard_batches

    shards = [{"id": i} for i in range(n)]
    batches = shard_batches(shards, workers, share=1.5, min_batch=4)
    assert [s["id"] for b in batches for s in b] == list(range(n))
    sizes = [len(b) for b in batches]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and all(s >= 4 for s in sizes[:-1])
    for r in range(0, len(sizes) - workers, workers):  # full rounds: one equal batch per worker
        assert len(set(sizes[r:r + workers])) == 1
    if n >= 4 * workers:
        assert len(batches) >= workers  # every worker gets work
        assert len(batches) <= workers * (2 + int(np.log(n) / np.log(1.5)))  # few task start-ups
    free = [0] * workers
    for s in sizes:
        heapq.heapreplace(free, free[0] + s)
    if sizes:
        assert max(free) - min(free) <= max(sizes[-workers:])


@pytest.mark.parametrize("dtype,gated", [("float16", False), ("float32", True)])
def test_schema_nbytes_is_the_created_arrays_size(tmp_path, dtype, gated):
    from neuron_embeddings.storage import schema
    from neuron_embeddings.storage.store import Store

    s = RunSettings(model="m", dataset="d", layers=(0, 2), n_sequences=12, ctx_len=8, k=5, shard_size=64,
                    embedding_dtype=dtype, scan_blocks=3)
    info = {"d_mlp": 96, "d_model": 16, "d_embed": 32 if gated else 16, "model": "m", "gated": gated}
    create_store(str(tmp_path / "s.zarr"), s, info, d_vocab=10)
    g = Store(str(tmp_path / "s.zarr")).group("r")
    sizes = schema.sizes(2, 96, 16, info["d_embed"], 5, 12, 8, 10, 3)
    created = sum(g[a.path].nbytes for a in schema.ARRAYS
                  if a.dtype != "str" and (gated or not a.gated_only) and not a.logits_only)
    assert schema.nbytes(sizes, dtype, gated, str_bytes=0) == created
