"""The store: a Zarr v3 group (schema neuron-embeddings/1) plus shard markers.

With `storage.schema` (every array declared once), the only code that knows paths, chunking,
markers and the schema version; everything else reads and writes through the functions here.

- The arrays are created once, by `create_store`, before any task runs; chunks are aligned to the
  work units (a neuron shard = one layer row x a range of neurons; a scan block), so a task writes
  whole chunks and nothing else, and two tasks never write the same chunk.
- A shard is complete when its marker `_markers/<stage>/<shard>.done` exists; the marker is written
  only after the shard's data is written. A failed shard has `<shard>.failed` (the error text).
- Root attributes remember the settings; `check_settings` refuses a run with other settings.
"""
from __future__ import annotations

import contextlib
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
from neuron_embeddings.core.plan import NeuronShard
from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.storage import schema
from neuron_embeddings.storage.schema import (METRICS, N_SIMILAR, READABLE_VERSIONS, SCAN_FIELDS,  # noqa: F401
                                              SCHEMA_VERSION, WINDOW)

# Every write covers whole chunks of real data: skip Zarr's check of each chunk against the fill
# value (a full pass over 20 MB embedding chunks), and write what we were given.
zarr.config.set({"array.write_empty_chunks": True})



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
            try:
                self._group = zarr.open_group(self._zarr_target(), mode=mode)
            except FileNotFoundError:  # no store there (zarr's GroupNotFoundError is also a ValueError)
                raise
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
                raise UserError(f"{self.url}: the store's zarr.json is damaged ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}); restore it from a copy, "
                                "or choose a new --out path") from e
        return self._group

    @property
    def attrs(self) -> dict:
        return dict(self.group("r").attrs)

    def settings(self) -> RunSettings:
        attrs = self.attrs
        if attrs.get("schema_version") not in READABLE_VERSIONS:
            raise UserError(f"{self.url} is not a neuron-embeddings store (schema {SCHEMA_VERSION}); "
                            "choose a new --out path")
        return RunSettings.from_attrs(attrs)

    @property
    def gated(self) -> bool:
        """Whether the store's units are gated MLP neurons (weights/W_gate, embeddings [x*W_gate ; x*W_in])."""
        return bool(self.attrs.get("gated", False))

    def array(self, name: str | schema.ArraySpec) -> zarr.Array:
        return self.group("r")[_path(name)]

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

    def marker_record(self, stage: str, unit: str) -> bytes:
        """The bytes of a unit's `.done` marker (its record; changes whenever the unit is redone)."""
        return self.fs.cat_file(self._marker(stage, unit, "done"))

    def failure_message(self, stage: str, unit: str) -> str:
        p = self._marker(stage, unit, "failed")
        return self.fs.cat_file(p).decode() if self.fs.exists(p) else ""

    def _write_atomic(self, path: str, data: bytes, durable: bool = True) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # e.g. a full disk: leave no half-written temporary file behind
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:  # one PUT on object storage is atomic
            self.fs.pipe_file(path, data)

    # the explorer's own caches (derived data, never a source of truth)
    def read_explorer_cache(self, name: str) -> bytes | None:
        """The bytes of the explorer's cache file `name` (e.g. "top_tokens.npz"), or None."""
        try:
            return self.fs.cat_file(f"{self.root}/_explorer/{name}")
        except (OSError, FileNotFoundError):
            return None

    def write_explorer_cache(self, name: str, data: bytes) -> None:
        """Replace the explorer's cache file `name` atomically (OSError on a read-only store)."""
        self._write_atomic(f"{self.root}/_explorer/{name}", data)

    def open_read_only(self, zarr_store=None) -> zarr.Group:
        """The store's Zarr group, read-only (through `zarr_store` instead, when given: tests count
        the chunks a reader touches with it)."""
        return zarr.open_group(zarr_store or self._zarr_target(), mode="r")

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
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise UserError(
            f"{store.url} is not a neuron-embeddings store of schema {SCHEMA_VERSION} "
            f"(found {attrs.get('schema_version')!r}); choose a new --out path")
    diffs = store.settings().differences(settings)
    if diffs:
        raise UserError(
            f"{store.url} was made with other settings ({'; '.join(diffs)}); rerun with the store's "
            f"settings to resume, or choose a new --out path")


def create_store(url: str, settings: RunSettings, model_info: dict, d_vocab: int) -> Store:
    """Write the store's template: root attributes first, then every array of the schema that is
    not there yet. Idempotent: a creation cut short is completed by calling it again; existing
    arrays must have the planned shape and are left as they are."""
    store = Store(url)
    dim_sizes = schema.sizes(len(settings.layers), model_info["d_mlp"], model_info["d_model"],
                             model_info.get("d_embed", model_info["d_model"]), settings.k, settings.n_sequences,
                             settings.ctx_len, d_vocab, settings.scan_blocks)
    g = zarr.open_group(store._zarr_target(), mode="a", zarr_format=3)
    if "schema_version" not in g.attrs:
        g.attrs.update(_root_attrs(settings, model_info, d_vocab))
    for spec in schema.ARRAYS:
        if spec.gated_only and not model_info.get("gated", False):
            continue
        shape = schema.shape(spec, dim_sizes)
        if spec.path in g:
            assert tuple(g[spec.path].shape) == shape, f"{spec.path} exists with shape {g[spec.path].shape}"
            continue
        dtype = settings.embedding_dtype if spec.dtype == "embedding" else (str if spec.dtype == "str" else spec.dtype)
        kw = {} if spec.compress is True else (
            {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}
            if spec.compress == "fast" else {"compressors": None})
        if dtype is not str:
            kw["fill_value"] = spec.fill
        g.create_array(spec.path, shape=shape, dtype=dtype, chunks=schema.chunks(spec, dim_sizes, settings.shard_size),
                       **kw)
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


def _path(name: str | schema.ArraySpec) -> str:
    return name.path if isinstance(name, schema.ArraySpec) else name


def write(store: Store, name: str | schema.ArraySpec, sel: tuple, data: np.ndarray) -> None:
    """Write a region that covers whole chunks (asserted) of array `name`."""
    a = store.group("r+")[_path(name)]
    _check_aligned(a, sel)
    a[sel] = data


def write_many(store: Store, sel: tuple, arrays: dict) -> None:
    """Write the same chunk-aligned region of several arrays, concurrently (one round trip to
    Zarr's I/O loop; chunk encoding and file writes overlap). Returns when every write is done."""
    g = store.group("r+")
    targets = [(g[_path(name)], data) for name, data in arrays.items()]
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


def read(store: Store, name: str | schema.ArraySpec, sel: tuple = ()) -> np.ndarray:
    a = store.array(name)
    return a[sel] if sel else a[...]


def shard_region(shard: NeuronShard) -> tuple:
    return (shard.row, slice(shard.start, shard.stop))


# --- typed reads and writes, by stage -------------------------------------------------------

def write_prepared(store: Store, tokens_ST: np.ndarray, vocab: list[str], weights: dict[str, np.ndarray]) -> None:
    """The prepare stage's arrays: tokens, vocabulary, and the weights the embeddings multiply x by
    (by name: W_in [rows, d_model, units], b_in [rows, units], and W_gate, b_gate for gated MLPs)."""
    write(store, schema.TOKENS, (slice(None), slice(None)), tokens_ST)
    write(store, schema.VOCAB, (slice(None),), np.array(vocab, dtype=object).astype(str))
    for name in ("W_in", "b_in", "W_gate", "b_gate"):
        if name in weights:
            write(store, schema.WEIGHTS[name], (slice(None),), weights[name])


def read_tokens(store: Store, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """int32 [sequences, ctx_len]: rows start..stop of `tokens` (all by default)."""
    return read(store, schema.TOKENS, (slice(start, stop),))


def read_token_rows(store: Store, rows: np.ndarray) -> np.ndarray:
    """int32 [len(rows), ctx_len]: the given (sorted, unique) rows of `tokens`."""
    return store.array(schema.TOKENS).get_orthogonal_selection((rows, slice(None)))


def read_vocab(store: Store) -> np.ndarray:
    return read(store, schema.VOCAB)


def write_block_maxima(store: Store, block: int, gmax_LM: np.ndarray) -> None:
    write(store, schema.SCAN_MAX, (block,), gmax_LM)


def read_maxima(store: Store) -> np.ndarray:
    """float32 [rows, units]: each unit's maximum over every scan block."""
    return read(store, schema.SCAN_MAX).max(axis=0)


def write_block_table(store: Store, block: int, row: int, table: dict[str, np.ndarray]) -> None:
    """One store row of a scan block's partial top-k table (`schema.SCAN_FIELDS`, slot order)."""
    write_many(store, (block, row), {schema.SCAN[name]: data for name, data in table.items()})


def read_block_tables(store: Store, region: tuple) -> dict[str, np.ndarray]:
    """Every scan block's partial table for a shard region (row, units): field -> [blocks, S, k, ...]."""
    return {name: read(store, schema.SCAN[name], (slice(None), *region)) for name in schema.SCAN_FIELDS}


def read_weights(store: Store, region: tuple) -> np.ndarray:
    """float32 [d_embed, S]: the input weights of a shard region's units, in the embedding's layout
    ([W_gate ; W_in] for gated MLP neurons, else W_in)."""
    row, units = region
    names = (schema.W_GATE, schema.W_IN) if store.gated else (schema.W_IN,)
    parts = [read(store, spec, (row, slice(None), units)) for spec in names]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def write_topk(store: Store, region: tuple, act: np.ndarray, seq: np.ndarray, pos: np.ndarray,
               window: np.ndarray, embeddings: np.ndarray) -> None:
    """The embed stage's arrays for a shard region."""
    write_many(store, region, {schema.TOPK_ACT: act, schema.TOPK_SEQ: seq, schema.TOPK_POS: pos,
                               schema.TOPK_WINDOW: window, schema.EMBEDDINGS: embeddings})


def write_clusters(store: Store, region: tuple, labels: np.ndarray, linkage: np.ndarray,
                   metrics: dict[str, np.ndarray]) -> None:
    """The cluster stage's arrays for a shard region (metrics by name, `schema.METRICS`)."""
    write_many(store, region, {schema.LABELS: labels, schema.LINKAGE: linkage,
                               **{schema.METRIC_ARRAYS[m]: metrics[m] for m in schema.METRICS}})


def write_centroids(store: Store, region: tuple, centroids: np.ndarray, top_token: np.ndarray,
                    top_count: np.ndarray) -> None:
    write_many(store, region, {schema.CENTROIDS: centroids, schema.TOP_TOKEN: top_token,
                               schema.TOP_COUNT: top_count})


def write_similar(store: Store, region: tuple, neighbours: np.ndarray, cosine: np.ndarray) -> None:
    write(store, schema.NEIGHBOURS, region, neighbours)
    write(store, schema.COSINE, region, cosine)


def read_metrics(store: Store, names: tuple[str, ...] = METRICS, region: tuple = ()) -> dict[str, np.ndarray]:
    return {m: read(store, schema.METRIC_ARRAYS[m], region) for m in names}


def centroid_dtype(store: Store) -> np.dtype:
    return store.array(schema.CENTROIDS).dtype


def n_similar(store: Store) -> int:
    return store.array(schema.COSINE).shape[-1]
