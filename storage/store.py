"""The store: a Zarr v3 group (schema neuron-embeddings/1) plus shard markers.

With `storage.schema` (every array declared once), the only code that knows paths, chunking,
markers and the schema version; everything else reads and writes through the functions here.

- The arrays are created once, by `create_store`, before any task runs; chunks are aligned to the
  work units (a neuron shard = one layer row x a range of neurons; a scan block), so a task writes
  whole chunks and nothing else, and two tasks never write the same chunk.
- A shard is complete when its marker `<stage>/<shard>.done` exists; the marker is written only after
  the shard's data is written, and records every chunk the shard wrote (key, size, crc32c: see
  `storage.integrity`). A failed shard has `<shard>.failed` (the error text).
- Markers, progress files and the explorer's caches are not Zarr data: they live in the store's
  state directory, a hidden sibling `.<name>.state/` (Zarr lists every entry of a group's folder
  and warns on those that are not nodes). Stores of older versions kept them in the store
  (`_markers/`, `_progress/`, `_explorer/`): those are still read; new ones are written beside.
- Root attributes remember the settings; `check_settings` refuses a run with other settings.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import google_crc32c  # a dependency of zarr 3 (its crc32c codec)
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.plan import NeuronShard
from neuron_embeddings.core.settings import HIST_BINS, RunSettings, strata_intervals
from neuron_embeddings.storage import schema
from neuron_embeddings.storage.schema import (METRICS, N_SIMILAR, READABLE_VERSIONS, SCAN_FIELDS,  # noqa: F401
                                              SCHEMA_VERSION, WINDOW)

# Every write covers whole chunks of real data: skip Zarr's check of each chunk against the fill
# value (a full pass over 20 MB embedding chunks), and write what we were given.
zarr.config.set({"array.write_empty_chunks": True})



# --- opening ----------------------------------------------------------------------------------

def crc32c(data) -> int:
    """CRC-32C (Castagnoli) of a bytes-like object (hardware-accelerated where the CPU has it)."""
    return int(google_crc32c.value(data))


class _RecordingStore(WrapperStore):
    """A Zarr store that remembers every chunk written through it: key -> [bytes, crc32c]."""

    def __init__(self, store, written: dict | None = None):
        super().__init__(store)
        self.written = {} if written is None else written

    def _with_store(self, store):
        return type(self)(store, self.written)

    async def set(self, key: str, value) -> None:
        await self._store.set(key, value)
        if not key.endswith("zarr.json"):
            data = value.as_numpy_array()
            self.written[key] = [int(data.nbytes), crc32c(data)]


_JSON: dict[str, tuple[tuple, dict]] = {}  # zarr.json path -> (its stat, its parsed content)
_CHUNK_IO: dict[str, tuple[tuple, "_ChunkIO"]] = {}  # array folder -> (its zarr.json's stat, reader/writer)
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 4096  # entries of each cache; past it, they start again (a process that opens many stores)


def _stat_key(path: str) -> tuple:
    """What changes whenever a file is replaced or rewritten (Zarr writes zarr.json atomically)."""
    s = os.stat(path)
    return s.st_ino, s.st_size, s.st_mtime_ns


def _json_file(path: str) -> dict:
    """A local zarr.json, parsed once per process while the file is unchanged (shard tasks open
    the same few dozen files thousands of times). Raises FileNotFoundError, ValueError."""
    key = _stat_key(path)
    with _CACHE_LOCK:
        hit = _JSON.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    with open(path, "rb") as f:
        parsed = json.loads(f.read())
    with _CACHE_LOCK:
        if len(_JSON) >= _CACHE_MAX:
            _JSON.clear()
        _JSON[path] = (key, parsed)
    return parsed


class _ChunkIO:
    """Whole chunks of one array of a local store, encoded and decoded here by the array's own
    codecs (Zarr's synchronous codec methods) and read and written as files, without Zarr's I/O
    event loop. The shard tasks write and read a few small chunks per unit, and going through the
    loop cost more CPU than their own computing (one loop thread for every shard thread, its
    metadata parsing and task hand-offs in Python: docs/performance.md). The bytes are Zarr's."""

    def __init__(self, folder: str, meta_dict: dict):
        from zarr.core.array_spec import ArrayConfig
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.codec_pipeline import codecs_from_list
        from zarr.core.metadata.v3 import ArrayV3Metadata

        self.folder = folder
        self.meta = ArrayV3Metadata.from_dict(meta_dict)
        self.shape, self.chunks = tuple(self.meta.shape), tuple(self.meta.chunks)
        self.dtype = self.meta.dtype.to_native_dtype()
        self.proto = default_buffer_prototype()
        self.spec = self.meta.get_chunk_spec((0,) * len(self.shape), ArrayConfig.from_dict({}), self.proto)
        self.aa, self.ab, self.bb = codecs_from_list(self.meta.codecs)
        self.specs = [self.spec]  # the chunk's spec before each array-to-array codec, then after the last
        for codec in self.aa:
            self.specs.append(codec.resolve_metadata(self.specs[-1]))
        self.direct = self.dtype.kind in "biuf"  # strings (the vocabulary): through Zarr

    def key(self, coords: tuple[int, ...]) -> str:
        return self.meta.encode_chunk_key(coords)

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's stored bytes (uint8), as Zarr would write them."""
        buf = self.proto.nd_buffer.from_numpy_array(np.ascontiguousarray(chunk, dtype=self.dtype))
        for codec, spec in zip(self.aa, self.specs):
            buf = codec._encode_sync(buf, spec)
        out = self.ab._encode_sync(buf, self.specs[-1])
        for codec in self.bb:
            out = codec._encode_sync(out, self.specs[-1])
        return out.as_numpy_array()

    def decode(self, data_n: np.ndarray) -> np.ndarray:
        """A chunk from its stored bytes (uint8 [n]; uncompressed chunks are a view of them)."""
        buf = self.proto.buffer.from_array_like(data_n)
        for codec in reversed(self.bb):
            buf = codec._decode_sync(buf, self.specs[-1])
        arr = self.ab._decode_sync(buf, self.specs[-1])
        for codec, spec in zip(reversed(self.aa), reversed(self.specs[:-1])):
            arr = codec._decode_sync(arr, spec)
        out = arr.as_numpy_array().reshape(self.chunks)
        return out if out.flags.writeable else out.copy()  # some codecs decode into bytes objects

    def read_chunk(self, coords: tuple[int, ...]) -> np.ndarray:
        """The chunk (chunk-shaped; the fill value where it was never written)."""
        try:
            with open(f"{self.folder}/{self.key(coords)}", "rb") as f:
                data_n = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)  # writable, unlike bytes
                if f.readinto(memoryview(data_n)) != data_n.size:
                    raise OSError(f"{self.folder}/{self.key(coords)}: the chunk changed while it was read")
        except FileNotFoundError:
            return np.full(self.chunks, self.meta.fill_value, dtype=self.dtype)
        return self.decode(data_n)

    def write_chunk(self, coords: tuple[int, ...], chunk: np.ndarray) -> tuple[str, list[int]]:
        """Write one whole chunk atomically (a temporary file renamed over it, as Zarr's LocalStore
        does); returns its key and [bytes, crc32c]."""
        key = self.key(coords)
        path = f"{self.folder}/{key}"
        data = self.encode(chunk)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return key, [int(data.nbytes), crc32c(data)]


def _chunk_spans(shape: tuple, chunks: tuple, sel: tuple) -> list[list[tuple[int, int, int]]] | None:
    """Per dimension, the chunks a selection of slices and integers covers as (chunk index, start,
    stop) in array coordinates, or None where it is not a plain selection (steps, arrays)."""
    full = tuple(sel) + (slice(None),) * (len(shape) - len(sel))
    if len(full) != len(shape):
        return None
    spans = []
    for s, n, c in zip(full, shape, chunks):
        if isinstance(s, (int, np.integer)):
            i = int(s) + n if s < 0 else int(s)
            if not 0 <= i < n:
                return None
            start, stop = i, i + 1
        elif isinstance(s, slice) and s.step in (None, 1):
            start, stop, _ = s.indices(n)
            if stop <= start:
                return None
        else:
            return None
        spans.append(_spans_1d(start, stop, c))
    return spans


def _spans_1d(start: int, stop: int, c: int) -> list[tuple[int, int, int]]:
    out, b = [], start
    while b < stop:
        e = min((b // c + 1) * c, stop)
        out.append((b // c, b, e))
        b = e
    return out


class Store:
    """A store at a local path or fsspec URL."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._group = None
        self._writer = None  # the recording Zarr store writes go through (one per Store)
        self._written: dict[str, list[int]] = {}  # chunks written through this object (Zarr's or _ChunkIO)
        self._arrays: dict[str, zarr.Array] = {}  # path -> array of the current group, opened once
        parent, _, name = self.root.rpartition("/")
        self.state = f"{parent}/.{name}.state"  # markers, progress, explorer caches (not Zarr data)
        self._identity: str | None = None
        self._state_valid: bool | None = None

    # zarr
    def _zarr_target(self):
        return self.root if self.local else self.url

    def exists(self) -> bool:
        return self.fs.exists(f"{self.root}/zarr.json")

    def group(self, mode: str = "r+") -> zarr.Group:
        try:
            if mode == "r+":  # writes go through the recorder, so markers can list what a unit wrote
                if self._writer is None:
                    base = LocalStore(self.root) if self.local else FsspecStore.from_url(self.url)
                    self._writer = _RecordingStore(base, self._written)
                if self._group is None or self._group.store is not self._writer:  # once per Store object
                    # each array's own metadata, never a consolidated copy (~10 ms to parse on a finished store)
                    self._group, self._arrays = zarr.open_group(self._writer, mode="r+", use_consolidated=False), {}
            elif self._group is None:
                self._group, self._arrays = zarr.open_group(self._zarr_target(), mode=mode), {}
        except FileNotFoundError:  # no store there (zarr's GroupNotFoundError is also a ValueError)
            raise
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{self.url}: the store's zarr.json is damaged ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); restore it from a copy, "
                            "or choose a new --out path") from e
        return self._group

    def written_chunks(self) -> dict[str, list[int]]:
        """Every chunk written through this Store object: key (relative to the store) -> [bytes, crc32c]."""
        return dict(self._written)

    @property
    def attrs(self) -> dict:
        if self.local:  # the root zarr.json, parsed once per process while unchanged
            try:
                meta = _json_file(f"{self.root}/zarr.json")
                if meta.get("node_type") == "group":
                    return copy.deepcopy(meta["attributes"])  # the cached parse is shared: a copy to change
                return dict(self.group("r").attrs)
            except FileNotFoundError:
                pass  # as Zarr says it
            except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{self.url}: the store's zarr.json is damaged ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}); restore it from a copy, "
                                "or choose a new --out path") from e
        return dict(self.group("r").attrs)

    def chunk_io(self, name: str | schema.ArraySpec) -> "_ChunkIO | None":
        """An array of a local store: its metadata, and whole-chunk I/O where `.direct` (None: not
        a local store, or no such array; go through Zarr)."""
        if not self.local:
            return None
        folder = f"{self.root}/{_path(name)}"
        try:
            key = _stat_key(f"{folder}/zarr.json")
        except FileNotFoundError:
            return None
        with _CACHE_LOCK:
            hit = _CHUNK_IO.get(folder)
        if hit is None or hit[0] != key:
            hit = (key, _ChunkIO(folder, _json_file(f"{folder}/zarr.json")))
            with _CACHE_LOCK:
                if len(_CHUNK_IO) >= _CACHE_MAX:
                    _CHUNK_IO.clear()
                _CHUNK_IO[folder] = hit
        return hit[1]

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

    def array(self, name: str | schema.ArraySpec, write: bool = False) -> zarr.Array:
        """An array of the store (opened once per Store object and group: a new group, e.g. the
        writable one after a read, starts afresh; `write`: through the recorder, for writes)."""
        g, path = self.group("r+" if write else "r"), _path(name)
        if path not in self._arrays:
            self._arrays[path] = g[path]
        return self._arrays[path]

    # the state directory: tied to the store by its identity, so that the state of a deleted store
    # is never taken for a new store's at the same path
    def identity(self) -> str | None:
        """The store's `store_id` attribute (stores of older versions: their creation time); None
        while there is no store."""
        if self._identity is None:
            try:
                attrs = self.attrs if self.exists() else {}
            except (OSError, ValueError, KeyError):
                attrs = {}
            ident = attrs.get("store_id") or (f"created {attrs['created']}" if "created" in attrs else None)
            self._identity = ident
        return self._identity

    def _state_ok(self, write: bool = False) -> bool:
        """Whether the state directory belongs to this store. With `write`, make it so: claim a
        missing one, and remove one left by a deleted store at this path."""
        if self._state_valid:
            return True
        ident = self.identity()
        if ident is None:
            return False
        path = f"{self.state}/store.json"
        try:
            found = json.loads(self.fs.cat_file(path)).get("store_id")
        except FileNotFoundError:
            found = None
        except (OSError, ValueError, AttributeError):
            found = ""
        if found != ident and write:
            if found is not None:  # another store's (deleted) state
                self.fs.rm(self.state, recursive=True)
            self._write_atomic(path, json.dumps({"store_id": ident, "store": self.root}).encode())
            found = ident
        self._state_valid = found == ident
        return self._state_valid

    def _claim_state(self) -> None:
        self._state_valid = None
        self._state_ok(write=True)

    # markers
    def _marker(self, stage: str, unit: str, kind: str, old: bool = False) -> str:
        return (f"{self.root}/_markers" if old else f"{self.state}/markers") + f"/{stage}/{unit}.{kind}"

    def _marker_places(self, stage: str, unit: str, kind: str) -> list[str]:
        """Where a marker may be: the state directory (when it is this store's), then inside the
        store (older versions)."""
        places = [self._marker(stage, unit, kind)] if self._state_ok() else []
        return places + [self._marker(stage, unit, kind, old=True)]

    def is_complete(self, stage: str, unit: str) -> bool:
        return any(self.fs.exists(p) for p in self._marker_places(stage, unit, "done"))

    def mark_complete(self, stage: str, unit: str, record: dict) -> None:
        """Mark a unit complete; its record gets the chunks written through this Store object."""
        record = {**record, "completed": time.time(), "chunks": self.written_chunks()}
        if not self._state_ok(write=True):
            raise RuntimeError(f"{self.url}: cannot mark {stage} {unit} complete: the store's attributes cannot be read")
        self._write_atomic(self._marker(stage, unit, "done"), json.dumps(record).encode())
        for p in self._marker_places(stage, unit, "failed"):
            if self.fs.exists(p):
                self.fs.rm(p)

    def mark_failed(self, stage: str, unit: str, message: str) -> None:
        if not self._state_ok(write=True):  # no store yet (its creation failed): nothing to mark
            return
        self._write_atomic(self._marker(stage, unit, "failed"), message.encode())

    def clear_marker(self, stage: str, unit: str) -> None:
        for kind in ("done", "failed"):
            for p in self._marker_places(stage, unit, kind):
                if self.fs.exists(p):
                    self.fs.rm(p)

    def marker_stages(self) -> list[str]:
        """The stages that have a marker directory (either place)."""
        out = set()
        for d in ([f"{self.state}/markers"] if self._state_ok() else []) + [f"{self.root}/_markers"]:
            if self.fs.exists(d):
                out.update(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False))
        return sorted(out)

    def marker_states(self, stage: str) -> dict[str, str]:
        """unit -> 'complete' | 'failed' for the units that have a marker (either place)."""
        out: dict[str, str] = {}
        dirs = [f"{self.root}/_markers/{stage}"] + ([f"{self.state}/markers/{stage}"] if self._state_ok() else [])
        for d in dirs:
            if not self.fs.exists(d):
                continue
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
        for p in self._marker_places(stage, unit, "done"):
            try:
                return self.fs.cat_file(p)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(self._marker(stage, unit, "done"))

    def failure_message(self, stage: str, unit: str) -> str:
        for p in self._marker_places(stage, unit, "failed"):
            if self.fs.exists(p):
                return self.fs.cat_file(p).decode()
        return ""

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

    def marker_stamp(self) -> tuple:
        """A summary of every marker file (name, size, modification time where the filesystem
        gives one) that changes whenever a unit is marked, cleared or redone."""
        out = []
        for d in ([f"{self.state}/markers"] if self._state_ok() else []) + [f"{self.root}/_markers"]:
            try:
                found = self.fs.find(d, detail=True) if self.fs.exists(d) else {}
            except OSError:
                found = {}
            out += sorted((p, info.get("size"), str(info.get("mtime", info.get("LastModified", ""))))
                          for p, info in found.items())
        return tuple(out)

    # the run's plan (written by the run at its start; read by the explorer to say how far it is)
    def write_plan(self, units: dict[str, list[str]]) -> None:
        """Every stage's unit ids (an empty list for a stage that does not run)."""
        if not self._state_ok(write=True):
            return
        self._write_atomic(f"{self.state}/plan.json", json.dumps(units).encode())

    def read_plan(self) -> dict[str, list[str]] | None:
        if not self._state_ok():
            return None
        try:
            return json.loads(self.fs.cat_file(f"{self.state}/plan.json"))
        except (OSError, ValueError):
            return None

    # the explorer's own caches (derived data, never a source of truth)
    def read_explorer_cache(self, name: str) -> bytes | None:
        """The bytes of the explorer's cache file `name` (e.g. "top_tokens.npz"), or None."""
        places = ([f"{self.state}/explorer/{name}"] if self._state_ok() else []) + [f"{self.root}/_explorer/{name}"]
        for p in places:
            try:
                return self.fs.cat_file(p)
            except (OSError, FileNotFoundError):
                continue
        return None

    def write_explorer_cache(self, name: str, data: bytes) -> None:
        """Replace the explorer's cache file `name` atomically (OSError on a read-only store)."""
        if not self._state_ok(write=True):
            raise OSError(f"{self.url}: no store to keep a cache for")
        self._write_atomic(f"{self.state}/explorer/{name}", data)

    def open_read_only(self, zarr_store=None) -> zarr.Group:
        """The store's Zarr group, read-only (through `zarr_store` instead, when given: tests count
        the chunks a reader touches with it)."""
        return zarr.open_group(zarr_store or self._zarr_target(), mode="r")

    # progress (a side channel for progress bars and UI artifacts; not a source of truth)
    def write_progress(self, stage: str, unit: str, done: int, total: int) -> None:
        rec = {"done": done, "total": total, "time": time.time()}
        if not self._state_ok(write=True):
            return
        self._write_atomic(f"{self.state}/progress/{stage}/{unit}.json", json.dumps(rec).encode(), durable=False)

    def read_progress(self, stage: str) -> dict[str, dict]:
        out = {}
        dirs = [f"{self.root}/_progress/{stage}"] + ([f"{self.state}/progress/{stage}"] if self._state_ok() else [])
        try:
            for d in dirs:
                for p in self.fs.ls(d, detail=False) if self.fs.exists(d) else []:
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
    arrays must have the planned shape and are left as they are. Claims the state directory
    (removing one a deleted store at this path left behind)."""
    store = Store(url)
    g = zarr.open_group(store._zarr_target(), mode="a", zarr_format=3)
    if "schema_version" not in g.attrs:
        g.attrs.update(_root_attrs(settings, model_info, d_vocab))
    store._claim_state()
    attrs = dict(g.attrs)
    for spec in array_specs(attrs):
        shape = schema.shape(spec, dim_sizes(attrs))
        if spec.path in g:
            assert tuple(g[spec.path].shape) == shape, f"{spec.path} exists with shape {g[spec.path].shape}"
            continue
        _create_array(g, spec, attrs)
    g[schema.LAYER.path][...] = np.asarray(settings.layers, dtype=np.int32)
    g[schema.OFFSET.path][...] = np.arange(-WINDOW[0], WINDOW[1] + 1, dtype=np.int32)
    return store


def array_specs(attrs: dict) -> list[schema.ArraySpec]:
    """The schema's arrays that a store with these root attributes has."""
    feats = schema.features(attrs)
    return [spec for spec in schema.ARRAYS if schema.has(spec, feats)]


def dim_sizes(attrs: dict) -> dict[str, int]:
    """The size of every dimension of a store, from its root attributes."""
    return schema.sizes(int(attrs["n_layers"]), int(attrs["d_mlp"]), int(attrs["d_model"]),
                        int(attrs.get("d_embed", attrs["d_model"])), int(attrs["k"]), int(attrs["n_sequences"]),
                        int(attrs["ctx_len"]), int(attrs["d_vocab"]), int(attrs["scan_blocks"]),
                        len(attrs.get("strata") or ()), int(attrs.get("strata_k", 0)), int(attrs.get("hist_bins", 0)),
                        int(attrs["d_resid"]) if "d_resid" in attrs else None)


def _create_array(g: zarr.Group, spec: schema.ArraySpec, attrs: dict, overwrite: bool = False) -> zarr.Array:
    """Create one array of the schema in group `g` (its metadata only), sized by the store's attributes."""
    sizes = dim_sizes(attrs)
    dtype = attrs["embedding_dtype"] if spec.dtype == "embedding" else (str if spec.dtype == "str" else spec.dtype)
    kw = {} if spec.compress is True else (
        {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")}
        if spec.compress == "fast" else {"compressors": None})
    if dtype is not str:
        kw["fill_value"] = spec.fill
    return g.create_array(spec.path, shape=schema.shape(spec, sizes), dtype=dtype,
                          chunks=schema.chunks(spec, sizes, int(attrs["shard_size"])), overwrite=overwrite,
                          dimension_names=spec.dims, **kw)


def schema_metadata(attrs: dict, spec: schema.ArraySpec) -> bytes:
    """The `zarr.json` an array of the schema gets in a store with these root attributes (made in
    memory by the code that creates stores)."""
    mem = zarr.storage.MemoryStore()
    _create_array(zarr.open_group(mem, mode="w", zarr_format=3), spec, attrs)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    return sync(mem.get(f"{spec.path}/zarr.json", prototype=default_buffer_prototype())).to_bytes()


def consolidate(store: Store) -> None:
    """Write every array's metadata into the root `zarr.json` (Zarr's consolidated metadata), so
    that a reader opens the store in a few reads instead of one per array (docs/store.md). Called
    when a run has completed every shard; safe to repeat, and to resume from: no array or attribute
    is created or changed after `create_store`, and a rerun writes it again."""
    import warnings

    with warnings.catch_warnings():  # "not part of the Zarr v3 specification": readers that do not
        warnings.filterwarnings("ignore", message="Consolidated metadata")  # know it walk the tree
        zarr.consolidate_metadata(store._zarr_target(), zarr_format=3)


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
        **({"strata_intervals": [list(iv) for iv in strata_intervals(settings.strata)], "hist_bins": HIST_BINS}
           if settings.strata else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store_id": uuid.uuid4().hex,  # ties the state directory (markers) to this store
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


def _region_view(data, spans: list, sel: tuple) -> np.ndarray | None:
    """`data` shaped like the region `spans` covers (integer dimensions as length 1), or None
    where it is not an array of the region's shape (a broadcast value)."""
    if not isinstance(data, np.ndarray):
        return None
    full = tuple(sel) + (slice(None),) * (len(spans) - len(sel))
    shape = tuple(sp[-1][2] - sp[0][1] for sp in spans)
    if data.shape not in (shape, tuple(n for n, s in zip(shape, full) if not isinstance(s, (int, np.integer)))):
        return None
    return data.reshape(shape)


def _pieces(spans: list, view: np.ndarray):
    """(chunk coordinates, array slices, the view's piece) of every chunk a region covers."""
    for combo in itertools.product(*spans):
        yield (tuple(i for i, _, _ in combo), tuple(slice(b, e) for _, b, e in combo),
               view[tuple(slice(b - sp[0][1], e - sp[0][1]) for (_, b, e), sp in zip(combo, spans))])


def _per_chunk(a: zarr.Array, sel: tuple, data) -> list[tuple[tuple, object]]:
    """A chunk-aligned write `a[sel] = data` as one write per chunk, each selecting its chunk with
    slices and given data of the chunk's shape: Zarr then encodes the data as it is (its path for
    complete chunks) instead of filling a chunk-sized buffer and copying the data into it (a
    quarter of the I/O thread's time in the scan's and embed's writes, profiled)."""
    spans = _chunk_spans(a.shape, a.chunks, sel)
    view = None if spans is None else _region_view(data, spans, sel)
    if view is None:
        return [(sel, data)]  # a broadcast value, or a selection Zarr resolves: as it is
    return [(where, piece) for _, where, piece in _pieces(spans, view)]


def write(store: Store, name: str | schema.ArraySpec, sel: tuple, data: np.ndarray) -> None:
    """Write a region that covers whole chunks (asserted) of array `name`."""
    write_many(store, sel, {name: data})


def write_many(store: Store, sel: tuple, arrays: dict) -> None:
    """Write the same chunk-aligned region of several arrays: whole interior chunks of a local
    store directly (`_ChunkIO`), the rest concurrently through Zarr's I/O loop (one round trip;
    chunk encoding and file writes overlap). Returns when every write is done."""
    rest = {}
    for name, data in arrays.items():
        if not _write_direct(store, name, sel, data):
            rest[name] = data
    if not rest:
        return
    targets = [(store.array(name, write=True), data) for name, data in rest.items()]
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

        await asyncio.gather(*(a.async_array.setitem(part, piece) for a, data in targets
                               for part, piece in _per_chunk(a, sel, data)))

    sync(_all())


def _write_direct(store: Store, name: str | schema.ArraySpec, sel: tuple, data) -> bool:
    """`a[sel] = data` chunk by chunk through _ChunkIO where every chunk it covers is a whole,
    interior chunk and `data` has the selection's shape; False (nothing written) otherwise."""
    io = store.chunk_io(name)
    if io is None or not io.direct:
        return False
    spans = _chunk_spans(io.shape, io.chunks, sel)
    view = None if spans is None else _region_view(data, spans, sel)
    if view is None or any(b != i * c or e != b + c for sp, c in zip(spans, io.chunks) for i, b, e in sp):
        return False  # a broadcast value, part of a chunk or an edge chunk: through Zarr
    for coords, _, piece in _pieces(spans, view):
        key, record = io.write_chunk(coords, piece)
        store._written[f"{_path(name)}/{key}"] = record
    return True


def _read_direct(store: Store, name: str | schema.ArraySpec, sel: tuple) -> np.ndarray | None:
    """`a[sel]` for slices and integers, chunk by chunk through _ChunkIO; None where it cannot."""
    io = store.chunk_io(name)
    if io is None or not io.direct:
        return None
    spans = _chunk_spans(io.shape, io.chunks, sel)
    if spans is None:
        return None
    full = tuple(sel) + (slice(None),) * (len(io.shape) - len(sel))
    shape = [sp[-1][2] - sp[0][1] for sp in spans]
    keep = [n for n, s in zip(shape, full) if not isinstance(s, (int, np.integer))]

    def in_chunk(coords: tuple, where: tuple) -> tuple:
        return tuple(slice(w.start - i * c, w.stop - i * c) for i, w, c in zip(coords, where, io.chunks))

    if all(len(sp) == 1 for sp in spans):  # one chunk (the usual shard read): no copy where it is all of it
        coords, where = tuple(sp[0][0] for sp in spans), tuple(slice(sp[0][1], sp[0][2]) for sp in spans)
        return io.read_chunk(coords)[in_chunk(coords, where)].reshape(keep)
    out = np.empty(shape, dtype=io.dtype)
    for coords, where, piece in _pieces(spans, out):
        piece[...] = io.read_chunk(coords)[in_chunk(coords, where)]
    return out.reshape(keep)


def read(store: Store, name: str | schema.ArraySpec, sel: tuple = ()) -> np.ndarray:
    got = _read_direct(store, name, sel)
    if got is not None:
        return got
    a = store.array(name)
    return a[sel] if sel else a[...]


def shard_region(shard: NeuronShard) -> tuple:
    return (shard.row, slice(shard.start, shard.stop))


# --- typed reads and writes, by stage -------------------------------------------------------

def write_prepared(store: Store, tokens_ST: np.ndarray, vocab: list[str], weights: dict[str, np.ndarray]) -> None:
    """The prepare stage's arrays: tokens, vocabulary, and the weights the embeddings multiply x by
    (by name: W_in [rows, d_model, units], b_in [rows, units], and W_gate, b_gate for gated MLPs;
    W_out [rows, units, d_resid] and W_U [d_resid, tokens] for the logit effects)."""
    write(store, schema.TOKENS, (slice(None), slice(None)), tokens_ST)
    write(store, schema.VOCAB, (slice(None),), np.array(vocab, dtype=object).astype(str))
    for name in ("W_in", "b_in", "W_gate", "b_gate"):
        if name in weights:
            write(store, schema.WEIGHTS[name], (slice(None),), weights[name])
    for spec, name in ((schema.W_OUT, "W_out"), (schema.W_U, "W_U")):
        if name in weights:
            write(store, spec, (slice(None),), weights[name])


def read_tokens(store: Store, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """int32 [sequences, ctx_len]: rows start..stop of `tokens` (all by default)."""
    return read(store, schema.TOKENS, (slice(start, stop),))


def read_token_rows(store: Store, rows: np.ndarray) -> np.ndarray:
    """int32 [len(rows), ctx_len]: the given (sorted, unique) rows of `tokens`."""
    io = store.chunk_io(schema.TOKENS)
    rows = np.asarray(rows, dtype=np.int64)
    if io is None or not io.direct or io.chunks[1] < io.shape[1] or (len(rows) and not 0 <= rows[0] <= rows[-1] < io.shape[0]):
        return store.array(schema.TOKENS).get_orthogonal_selection((rows, slice(None)))
    c = io.chunks[0]
    out = np.empty((len(rows), io.shape[1]), dtype=io.dtype)
    for chunk_row in np.unique(rows // c):  # each chunk of rows the selection touches, read once
        at = np.flatnonzero(rows // c == chunk_row)
        out[at] = io.read_chunk((int(chunk_row), 0))[rows[at] - chunk_row * c, :io.shape[1]]
    return out


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


def write_block_strata(store: Store, block: int, row: int, table: dict[str, np.ndarray], hist_MH: np.ndarray,
                       sum_M: np.ndarray) -> None:
    """One store row of a scan block's strata tables (stratum after stratum along the examples,
    slot order) and activation histograms and sums."""
    write_many(store, (block, row), {**{schema.SCAN_STRATA[name]: data for name, data in table.items()},
                                     schema.SCAN_HIST: hist_MH, schema.SCAN_SUM: sum_M})


def write_block_count(store: Store, block: int, count: int) -> None:
    write(store, schema.SCAN_COUNT, (slice(block, block + 1),), np.asarray([count], dtype=np.int64))


def read_block_strata(store: Store, region: tuple) -> dict[str, np.ndarray]:
    """Every block's strata tables for a shard region (field -> [blocks, S, n x strata_k, ...]),
    with `hist` [blocks, S, bins], `sum` [blocks, S] and `count` [blocks] (tokens per row)."""
    out = {name: read(store, schema.SCAN_STRATA[name], (slice(None), *region)) for name in schema.SCAN_FIELDS}
    out["hist"] = read(store, schema.SCAN_HIST, (slice(None), *region))
    out["sum"] = read(store, schema.SCAN_SUM, (slice(None), *region))
    out["count"] = read(store, schema.SCAN_COUNT)
    return out


def _array_meta(store: Store, spec: schema.ArraySpec):
    """An array's Zarr metadata (shape, chunks, chunk keys): parsed once per process on a local store."""
    io = store.chunk_io(spec)
    return io.meta if io is not None else store.array(spec).metadata


def scratch_keys(store: Store, region: tuple) -> list[str]:
    """Chunk keys (relative to the store) of the scan's partial tables of every block for one
    shard's region (row, neuron slice): what the embed stage reads and nothing else does."""
    row, neurons = region
    keys = []
    specs = list(schema.SCAN.values())
    if store.attrs.get("strata"):
        specs += [*schema.SCAN_STRATA.values(), schema.SCAN_HIST, schema.SCAN_SUM]
    for spec in specs:
        a = _array_meta(store, spec)
        rest = (0,) * (a.ndim - 3)  # example (and d_model / window): whole
        for b in range(a.shape[0]):
            keys.append(f"{spec.path}/{a.encode_chunk_key((b, row, neurons.start // a.chunks[2], *rest))}")
    return keys


def centroid_keys(store: Store, region: tuple) -> list[str]:
    """Chunk keys of `similar/centroids` for one shard's region (row, neuron slice): what only the
    similar stage reads; released once every similar shard is complete."""
    a = _array_meta(store, schema.CENTROIDS)
    row, neurons = region
    key = a.encode_chunk_key((row, neurons.start // a.chunks[1], *(0,) * (a.ndim - 2)))
    return [f"{schema.CENTROIDS.path}/{key}"]


def read_centroids(store: Store, region: tuple) -> np.ndarray | None:
    """A shard region's `similar/centroids`, or None when they were released (or never written)."""
    if not all(store.fs.exists(f"{store.root}/{key}") for key in centroid_keys(store, region)):
        return None
    return read(store, schema.CENTROIDS, region)


def release_scratch(store: Store, keys: list[str], midway=None) -> int:
    """Delete chunks that were only an intermediate (the scan's partial tables of a shard whose
    embeddings are durable; the centroids once every similar shard is complete): only after a
    marker that lists them (`releases`) is written; again on every later run (a kill midway leaves
    the rest). `midway()` is called halfway (tests inject a fault there). Returns how many chunks
    were deleted."""
    n = 0
    for i, key in enumerate(keys):
        if midway is not None and i == len(keys) // 2:
            midway()
        try:
            store.fs.rm_file(f"{store.root}/{key}")
            n += 1
        except FileNotFoundError:
            continue
    return n


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


def write_strata(store: Store, region: tuple, act: np.ndarray, seq: np.ndarray, pos: np.ndarray,
                 stratum: np.ndarray, window: np.ndarray, embeddings: np.ndarray) -> None:
    """The strata's examples for a shard region ([S, n x strata_k, ...])."""
    write_many(store, region, {schema.STRATA_ACT: act, schema.STRATA_SEQ: seq, schema.STRATA_POS: pos,
                               schema.STRATUM: stratum, schema.STRATA_WINDOW: window,
                               schema.STRATA_EMBEDDINGS: embeddings})


def write_distribution(store: Store, region: tuple, hist: np.ndarray, positive_fraction: np.ndarray,
                       mean: np.ndarray, maximum: np.ndarray) -> None:
    write_many(store, region, {schema.HIST: hist, schema.POSITIVE: positive_fraction, schema.MEAN: mean,
                               schema.MAX: maximum})


def write_spectrum(store: Store, region: tuple, labels: np.ndarray, counts: np.ndarray, n_clusters: np.ndarray,
                   mean_distance: np.ndarray, below_only: np.ndarray) -> None:
    """The clustering of the top-k and the strata together, for a shard region."""
    write_many(store, region, {schema.SPECTRUM_LABELS: labels, schema.SPECTRUM_COUNTS: counts,
                               schema.SPECTRUM_CLUSTERS: n_clusters, schema.SPECTRUM_DISTANCE: mean_distance,
                               schema.BELOW_ONLY: below_only})


def write_clusters(store: Store, region: tuple, labels: np.ndarray, linkage: np.ndarray,
                   metrics: dict[str, np.ndarray]) -> None:
    """The cluster stage's arrays for a shard region (metrics by name, `schema.METRICS`)."""
    write_many(store, region, {schema.LABELS: labels, schema.LINKAGE: linkage,
                               **{schema.METRIC_ARRAYS[m]: metrics[m] for m in schema.METRICS}})


def write_centroids(store: Store, region: tuple, centroids: np.ndarray | None, top_token: np.ndarray,
                    top_count: np.ndarray) -> None:
    """The centroids stage's arrays for a shard region (`centroids` None: only the top tokens, for a
    run without the similar stage, which alone reads the centroids)."""
    arrays = {schema.TOP_TOKEN: top_token, schema.TOP_COUNT: top_count}
    if centroids is not None:
        arrays[schema.CENTROIDS] = centroids
    write_many(store, region, arrays)


def write_similar(store: Store, region: tuple, neighbours: np.ndarray, cosine: np.ndarray) -> None:
    write(store, schema.NEIGHBOURS, region, neighbours)
    write(store, schema.COSINE, region, cosine)


def has_logits(store: Store) -> bool:
    """Whether the store has the logit effects' arrays (a model with an unembedding, made by a version
    that computes them)."""
    return bool(store.attrs.get("logit_effects", False))


def read_output_rows(store: Store, region: tuple) -> np.ndarray:
    """float32 [S, d_resid]: what a shard region's units write to the residual stream (weights/W_out)."""
    return read(store, schema.W_OUT, region)


def read_unembedding(store: Store) -> np.ndarray:
    """float32 [d_resid, tokens]: the folded unembedding (weights/W_U; NaN columns: tokens the model
    cannot output)."""
    return read(store, schema.W_U)


def write_logits(store: Store, region: tuple, effects: dict[str, np.ndarray]) -> None:
    """The logits stage's arrays for a shard region, by name (`schema.LOGITS`: top_tokens, top_values,
    bottom_tokens, bottom_values, each [S, N_LOGITS])."""
    write_many(store, region, {schema.LOGITS[name]: effects[name] for name in schema.LOGITS})


def read_metrics(store: Store, names: tuple[str, ...] = METRICS, region: tuple = ()) -> dict[str, np.ndarray]:
    return {m: read(store, schema.METRIC_ARRAYS[m], region) for m in names}


def centroid_dtype(store: Store) -> np.dtype:
    io = store.chunk_io(schema.CENTROIDS)
    return io.dtype if io is not None else store.array(schema.CENTROIDS).dtype


def n_similar(store: Store) -> int:
    return store.array(schema.COSINE).shape[-1]
