"""The store: a Zarr v3 group (schema neuron-embeddings/1) plus shard markers.

This is the only module that knows array names, paths, chunking and the schema version.

- The arrays are created once, by `create_store`, before any task runs; chunks are aligned to the
  work units (a neuron shard = one layer row x a range of neurons; a scan block), so a task writes
  whole chunks and nothing else, and two tasks never write the same chunk.
- A shard is complete when its marker `_markers/<stage>/<shard>.done` exists; the marker is written
  only after the shard's data is written. A failed shard has `<shard>.failed` (the error text).
- Root attributes remember the settings; `check_settings` refuses a run with other settings.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import zarr

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.settings import RunSettings

# Every write covers whole chunks of real data: skip Zarr's check of each chunk against the fill
# value (a full pass over 20 MB embedding chunks), and write what we were given.
zarr.config.set({"array.write_empty_chunks": True})

SCHEMA_VERSION = "neuron-embeddings/1"
STAGES = ("prepare", "maxima", "scan", "embed", "cluster", "centroids", "similar")
N_SIMILAR = 5  # nearest clusters of other neurons stored per cluster (similar/*)
WINDOW = (24, 8)  # activation window recorded around each example's max token: tokens before, after
METRICS = ("n_examples", "n_clusters", "max_distance", "mean_distance", "mean_intra", "mean_inter")


# --- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeuronShard:
    row: int  # row in the store (index into settings.layers)
    layer: int  # the model's layer index
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"L{self.layer:02d}-N{self.start:05d}"


@dataclass(frozen=True)
class ScanBlock:
    index: int
    start: int  # first sequence
    stop: int

    @property
    def id(self) -> str:
        return f"B{self.index:04d}"


def neuron_shards(settings: RunSettings, d_mlp: int) -> list[NeuronShard]:
    return [NeuronShard(row, layer, s, min(s + settings.shard_size, d_mlp))
            for row, layer in enumerate(settings.layers)
            for s in range(0, d_mlp, settings.shard_size)]


def scan_blocks(settings: RunSettings) -> list[ScanBlock]:
    edges = np.linspace(0, settings.n_sequences, settings.scan_blocks + 1).round().astype(int)
    return [ScanBlock(i, int(a), int(b)) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def stage_units(stage: str, settings: RunSettings, d_mlp: int) -> list[str]:
    """Ids of the work units of a stage, in plan order."""
    if stage == "prepare":
        return ["all"]
    if stage == "maxima":
        return [b.id for b in scan_blocks(settings)] if settings.band_fraction is not None else []
    if stage == "scan":
        return [b.id for b in scan_blocks(settings)]
    if stage == "similar" and not settings.similar:
        return []
    return [s.id for s in neuron_shards(settings, d_mlp)]


# --- opening ----------------------------------------------------------------------------------

class Store:
    """A store at a local path or fsspec URL."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._group = None

    # zarr
    def _zarr_target(self):
        return self.root if self.local else self.url

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    def group(self, mode: str = "r+") -> zarr.Group:
        if self._group is None or mode == "r+":
            self._group = zarr.open_group(self._zarr_target(), mode=mode)
        return self._group

    @property
    def attrs(self) -> dict:
        return dict(self.group("r").attrs)

    def settings(self) -> RunSettings:
        attrs = self.attrs
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{self.url} is not a neuron-embeddings store (schema {SCHEMA_VERSION}); "
                            "choose a new --out path")
        return RunSettings.from_attrs(attrs)

    def array(self, name: str) -> zarr.Array:
        return self.group("r")[name]

    # markers
    def _marker(self, stage: str, unit: str, kind: str) -> str:
        return f"{self.root}/_markers/{stage}/{unit}.{kind}"

    def is_complete(self, stage: str, unit: str) -> bool:
        return self.fs.exists(self._marker(stage, unit, "done"))

    def mark_complete(self, stage: str, unit: str, record: dict) -> None:
        self._write_atomic(self._marker(stage, unit, "done"), json.dumps(record).encode())
        failed = self._marker(stage, unit, "failed")
        if self.fs.exists(failed):
            self.fs.rm(failed)

    def mark_failed(self, stage: str, unit: str, message: str) -> None:
        self._write_atomic(self._marker(stage, unit, "failed"), message.encode())

    def clear_marker(self, stage: str, unit: str) -> None:
        for kind in ("done", "failed"):
            p = self._marker(stage, unit, kind)
            if self.fs.exists(p):
                self.fs.rm(p)

    def marker_states(self, stage: str) -> dict[str, str]:
        """unit -> 'complete' | 'failed' for the units that have a marker."""
        d = f"{self.root}/_markers/{stage}"
        if not self.fs.exists(d):
            return {}
        out: dict[str, str] = {}
        for p in self.fs.ls(d, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            unit, _, kind = name.rpartition(".")
            if kind == "done":
                out[unit] = "complete"
            elif kind == "failed":
                out.setdefault(unit, "failed")
        return out

    def failure_message(self, stage: str, unit: str) -> str:
        p = self._marker(stage, unit, "failed")
        return self.fs.cat_file(p).decode() if self.fs.exists(p) else ""

    def _write_atomic(self, path: str, data: bytes, durable: bool = True) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT on object storage is atomic
            self.fs.pipe_file(path, data)

    # progress (a side channel for progress bars and UI artifacts; not a source of truth)
    def write_progress(self, stage: str, unit: str, done: int, total: int) -> None:
        rec = {"done": done, "total": total, "time": time.time()}
        self._write_atomic(f"{self.root}/_progress/{stage}/{unit}.json", json.dumps(rec).encode(), durable=False)

    def read_progress(self, stage: str) -> dict[str, dict]:
        d = f"{self.root}/_progress/{stage}"
        out = {}
        try:
            paths = self.fs.ls(d, detail=False) if self.fs.exists(d) else []
            for p in paths:
                if p.endswith(".json"):
                    out[p.rsplit("/", 1)[-1][:-5]] = json.loads(self.fs.cat_file(p))
        except (OSError, ValueError):  # a progress file mid-replace; the next poll sees it
            pass
        return out


# --- creating ---------------------------------------------------------------------------------

def check_writable(url: str) -> None:
    """Refuse early an output location we cannot write."""
    fs, root = fsspec.core.url_to_fs(str(url))
    parent = root.rstrip("/").rsplit("/", 1)[0] if "/" in root.rstrip("/") else "."
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        p = Path(root)
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {url}: exists and is not a directory; choose another path")
        if p.is_dir() and any(not c.name.startswith("_lock.json") for c in p.iterdir()) \
                and not (p / "zarr.json").exists():
            raise UserError(f"--out {url}: directory exists, is not empty and is not a store; choose a new path")
        probe = p if p.exists() else Path(parent)
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise UserError(f"--out {url}: {probe} is a file, not a directory; choose another path")
        try:  # os.access says yes to root everywhere; really try
            fd, tmp = tempfile.mkstemp(prefix=".ne-write-probe-", dir=probe)
            os.close(fd)
            os.remove(tmp)
        except OSError as e:
            raise UserError(f"--out {url}: cannot write in {probe} ({e.strerror}); choose a path you can write to") from e
    elif not fs.exists(parent):
        raise UserError(f"--out {url}: parent location {parent} does not exist")


def check_settings(store: Store, settings: RunSettings) -> None:
    """Refuse to mix runs: an existing store must have been made with the same settings."""
    attrs = store.attrs
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{store.url} is not a neuron-embeddings store of schema {SCHEMA_VERSION} "
            f"(found {attrs.get('schema_version')!r}); choose a new --out path")
    diffs = store.settings().differences(settings)
    if diffs:
        raise UserError(
            f"{store.url} was made with other settings ({'; '.join(diffs)}); rerun with the store's "
            f"settings to resume, or choose a new --out path")


def _chunks_neuron(shape: tuple, shard_size: int) -> tuple:
    return (1, shard_size) + tuple(shape[2:])


def create_store(url: str, settings: RunSettings, model_info: dict, d_vocab: int) -> Store:
    """Write the store's template: root attributes first, then every array of the schema that is
    not there yet. Idempotent: a creation cut short is completed by calling it again; existing
    arrays must have the planned shape and are left as they are."""
    store = Store(url)
    L, M, D = len(settings.layers), model_info["d_mlp"], model_info["d_model"]
    K, S, T, NB = settings.k, settings.n_sequences, settings.ctx_len, settings.scan_blocks
    ss = min(settings.shard_size, M)
    g = zarr.open_group(store._zarr_target(), mode="a", zarr_format=3)
    if "schema_version" not in g.attrs:
        g.attrs.update(_root_attrs(settings, model_info, d_vocab))

    def arr(name, shape, dtype, fill, chunks=None, compress=True):
        """compress: True (Zarr's default, zstd), "fast" (blosc lz4 with byte shuffle: several
        times faster on the big float chunks written per shard, a little larger), or False."""
        if name in g:
            assert tuple(g[name].shape) == tuple(shape), f"{name} exists with shape {g[name].shape}"
            return
        chunks = chunks or _chunks_neuron(shape, ss)
        kw = {"compressors": None} if not compress else (
            {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")} if compress == "fast" else {})
        if dtype == str:
            kw = {}
        else:
            kw["fill_value"] = fill
        g.create_array(name, shape=shape, dtype=dtype, chunks=chunks, **kw)

    arr("tokens", (S, T), "int32", 0, chunks=(min(S, max(1, 2**20 // T)), T))
    arr("vocab", (d_vocab,), str, None, chunks=(d_vocab,))
    arr("topk/act", (L, M, K), "float32", np.nan)
    arr("topk/seq", (L, M, K), "int32", -1)
    arr("topk/pos", (L, M, K), "int32", -1)
    arr("embeddings", (L, M, K, D), settings.embedding_dtype, 0, compress=False)
    W = sum(WINDOW) + 1
    arr("topk/window", (L, M, K, W), "float32", np.nan, compress="fast")  # not in the contract: for the explorer
    arr("clusters/labels", (L, M, K), "int32", -1)
    arr("clusters/linkage", (L, M, K - 1, 4), "float32", np.nan)
    for m in METRICS:
        dt = "int32" if m in ("n_examples", "n_clusters") else "float32"
        arr(f"metrics/{m}", (L, M), dt, 0 if dt == "int32" else np.nan)
    # not in the contract: the weights the embeddings were made with, and the scan's partial results
    arr("weights/W_in", (L, D, M), "float32", 0, chunks=(1, D, ss), compress=False)
    arr("weights/b_in", (L, M), "float32", 0)
    arr("scan/key", (NB, L, M, K), "float64", -np.inf, chunks=(1, 1, ss, K))
    arr("scan/act", (NB, L, M, K), "float32", np.nan, chunks=(1, 1, ss, K))
    arr("scan/seq", (NB, L, M, K), "int32", -1, chunks=(1, 1, ss, K))
    arr("scan/pos", (NB, L, M, K), "int32", -1, chunks=(1, 1, ss, K))
    arr("scan/x", (NB, L, M, K, D), settings.embedding_dtype, 0, chunks=(1, 1, ss, K, D), compress=False)
    arr("scan/win", (NB, L, M, K, W), "float32", np.nan, chunks=(1, 1, ss, K, W), compress="fast")
    arr("scan/max", (NB, L, M), "float32", -np.inf, chunks=(1, L, M))
    # not in the contract: similar clusters (tasks/similar.py); slots c >= n_clusters stay empty
    arr("similar/centroids", (L, M, K, D), settings.embedding_dtype, 0, compress="fast")  # empty slots cost little
    arr("similar/top_token", (L, M, K), "int32", -1)
    arr("similar/top_count", (L, M, K), "int32", 0)
    arr("similar/neighbours", (L, M, K, N_SIMILAR, 3), "int32", -1)
    arr("similar/cosine", (L, M, K, N_SIMILAR), "float32", np.nan)
    return store


def window(store: Store) -> tuple[int, int]:
    """(tokens before, tokens after) the max token of the store's `topk/window`."""
    attrs = store.attrs
    return int(attrs.get("window_before", WINDOW[0])), int(attrs.get("window_after", WINDOW[1]))


def _root_attrs(settings: RunSettings, model_info: dict, d_vocab: int) -> dict:
    L = len(settings.layers)
    return {
        "schema_version": SCHEMA_VERSION,
        **settings.to_attrs(),
        "n_layers": L,
        "d_model": model_info["d_model"],
        "d_mlp": model_info["d_mlp"],
        "d_vocab": d_vocab,
        "window_before": WINDOW[0],
        "window_after": WINDOW[1],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{k: v for k, v in model_info.items() if k not in ("d_mlp", "d_model")},
    }


# --- chunk-aligned reads and writes -----------------------------------------------------------

def _check_aligned(a: zarr.Array, sel: tuple) -> None:
    for dim, s in enumerate(sel):
        if isinstance(s, slice):
            c, n = a.chunks[dim], a.shape[dim]
            start, stop = s.start or 0, n if s.stop is None else s.stop
            assert start % c == 0 and (stop % c == 0 or stop == n), (
                f"write to {a.path} {sel} is not chunk-aligned (chunks {a.chunks})")


def write(store: Store, name: str, sel: tuple, data: np.ndarray) -> None:
    """Write a region that covers whole chunks (asserted) of array `name`."""
    a = store.group("r+")[name]
    _check_aligned(a, sel)
    a[sel] = data


def write_many(store: Store, sel: tuple, arrays: dict[str, np.ndarray]) -> None:
    """Write the same chunk-aligned region of several arrays, concurrently (one round trip to
    Zarr's I/O loop; chunk encoding and file writes overlap). Returns when every write is done."""
    g = store.group("r+")
    targets = [(g[name], data) for name, data in arrays.items()]
    for a, _ in targets:
        _check_aligned(a, sel)
    try:
        from zarr.core.sync import sync
    except ImportError:  # pragma: no cover - other Zarr versions: one by one
        for a, data in targets:
            a[sel] = data
        return

    async def _all() -> None:
        import asyncio

        await asyncio.gather(*(a.async_array.setitem(sel, data) for a, data in targets))

    sync(_all())


def read(store: Store, name: str, sel: tuple = ()) -> np.ndarray:
    a = store.array(name)
    return a[sel] if sel else a[...]


def shard_region(shard: NeuronShard) -> tuple:
    return (shard.row, slice(shard.start, shard.stop))
