"""The activation cache of the SAE flow: one hook's activations over a dataset, as a Zarr v3 group.

Layout (a local directory, usually `<SAE_DIR>/activations.zarr`):

- `acts`   float16 or float32 [n_sequences * ctx_len, d_in]: row `s * ctx_len + t` is token t of
  sequence s; chunks of whole sequences (`rows_per_chunk` rows, about 8 MB), uncompressed
  (activations barely compress and decompression would cost the reader time);
- `tokens` int32 [n_sequences, ctx_len]: what the model was fed (for the next-token-loss metric);
- root attributes: the settings that made it (`key`), `d_in`, `rows_per_chunk`, and `complete`
  (set last, after every chunk is written).

Writers append whole chunks in order (`CacheWriter`); `ShuffledBatches` reads it back shuffled
with bounded memory: a fresh permutation of the chunks per epoch, rows shuffled within a buffer of
a few chunks, and the next buffer read by a background thread while the current one is consumed.
"""
from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from neuron_embeddings.core.errors import UserError

KIND = "neuron-embeddings/activation-cache/1"
CHUNK_BYTES = 8 << 20
DTYPES = ("float16", "float32")


def rows_per_chunk(d_in: int, ctx_len: int, itemsize: int, n_rows: int) -> int:
    """Rows per chunk: whole sequences, about CHUNK_BYTES, never more than the array."""
    seqs = max(1, CHUNK_BYTES // (d_in * itemsize * ctx_len))
    return min(seqs * ctx_len, n_rows)


class ActivationCache:
    """Read side of a complete cache (and its settings)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise UserError(f"activation cache {self.path}: not found") from e
        attrs = dict(self.group.attrs)
        if attrs.get("kind") != KIND:
            raise UserError(f"{self.path} is not an activation cache (no kind={KIND!r} attribute)")
        if not attrs.get("complete"):
            raise UserError(f"activation cache {self.path} is incomplete; rerun the command that writes it")
        self.attrs = attrs
        self.acts = self.group["acts"]

    @property
    def n_rows(self) -> int:
        return int(self.acts.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.acts.shape[1])

    @property
    def chunk_rows(self) -> int:
        return int(self.acts.chunks[0])

    def tokens(self) -> np.ndarray:
        return self.group["tokens"][...]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.acts[start:stop]


def existing_cache(path: str | Path, key: dict) -> ActivationCache | None:
    """The complete cache at `path` made with settings `key`, None if there is none (or an
    incomplete one, which the writer replaces). A complete cache made with other settings is
    refused: the user named a cache for something else."""
    p = Path(path)
    if not (p / "zarr.json").exists():
        if p.exists() and any(p.iterdir()):
            raise UserError(f"activation cache {p}: the directory exists and is not an activation cache; "
                            "choose another --cache path")
        return None
    attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    if attrs.get("kind") != KIND:
        raise UserError(f"{p} is a Zarr group but not an activation cache; choose another --cache path")
    if not attrs.get("complete"):
        return None
    if attrs.get("key") != key:
        diff = [f"{k}: {attrs.get('key', {}).get(k)!r} cached, {v!r} asked" for k, v in key.items()
                if attrs.get("key", {}).get(k) != v]
        raise UserError(f"activation cache {p} was made with other settings ({'; '.join(diff)}); "
                        "use another --cache path or delete it")
    return ActivationCache(p)


class CacheWriter:
    """Creates the cache (replacing an incomplete one) and appends rows in whole chunks."""

    def __init__(self, path: str | Path, key: dict, n_sequences: int, ctx_len: int, d_in: int, dtype: str):
        if dtype not in DTYPES:
            raise UserError(f"--activation-dtype {dtype!r}: use float16 or float32")
        self.path = Path(path)
        if (self.path / "zarr.json").exists():  # an incomplete cache of ours (checked by existing_cache)
            shutil.rmtree(self.path)
        n_rows = n_sequences * ctx_len
        self.dtype = np.dtype(dtype)
        chunk = rows_per_chunk(d_in, ctx_len, self.dtype.itemsize, n_rows)
        g = zarr.open_group(str(self.path), mode="w")
        g.attrs.update({"kind": KIND, "key": key, "complete": False, "d_in": d_in, "ctx_len": ctx_len,
                        "n_sequences": n_sequences, "rows_per_chunk": chunk, "dtype": dtype})
        self.acts = g.create_array("acts", shape=(n_rows, d_in), chunks=(chunk, d_in), dtype=self.dtype,
                                   compressors=None, fill_value=0, dimension_names=("row", "d_in"))
        self.tokens = g.create_array("tokens", shape=(n_sequences, ctx_len), dtype=np.int32,
                                     chunks=(max(1, min(n_sequences, 65536 // ctx_len)), ctx_len),
                                     dimension_names=("sequence", "position"))
        self.group, self.chunk, self.n_rows = g, chunk, n_rows
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._written = 0

    def write_tokens(self, tokens_ST: np.ndarray) -> None:
        self.tokens[...] = tokens_ST.astype(np.int32)

    def append(self, rows_ND: np.ndarray) -> None:
        """Add rows in order; whole chunks are written as soon as they are full."""
        self._buf.append(np.asarray(rows_ND, dtype=self.dtype))
        self._buffered += len(rows_ND)
        while self._buffered >= self.chunk or (self._buffered and self._written + self._buffered >= self.n_rows):
            data = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
            n = min(self.chunk, self.n_rows - self._written, len(data))
            self.acts[self._written:self._written + n] = data[:n]
            self._written += n
            rest = data[n:]
            self._buf, self._buffered = ([rest] if len(rest) else []), len(rest)
            if self._written >= self.n_rows:
                break

    def finish(self) -> ActivationCache:
        if self._written != self.n_rows:
            raise RuntimeError(f"activation cache: {self._written} rows written, {self.n_rows} expected")
        self.group.attrs["complete"] = True
        return ActivationCache(self.path)


class ShuffledBatches:
    """Shuffled float32 batches [batch_size, d_in] of rows [start, stop) of a cache.

    Per epoch: the chunks in a seeded random order, `buffer_chunks` at a time; each buffer's rows
    permuted and cut into batches (rows left over join the next buffer, so only the epoch's last
    batch can be short). Memory: at most `prefetch + 1` buffers of `buffer_chunks` chunks in float32.
    """

    def __init__(self, cache: ActivationCache, batch_size: int, rows: tuple[int, int] | None = None,
                 seed: int = 0, buffer_chunks: int = 4, prefetch: int = 2, device: str = "cpu"):
        self.cache, self.batch_size, self.seed = cache, int(batch_size), seed
        self.start, self.stop = rows if rows is not None else (0, cache.n_rows)
        if not 0 <= self.start < self.stop <= cache.n_rows:
            raise ValueError(f"rows {self.start}:{self.stop} outside the cache's {cache.n_rows} rows")
        c = cache.chunk_rows
        self.chunks = [(max(i, self.start), min(i + c, self.stop))
                       for i in range((self.start // c) * c, self.stop, c)]
        self.buffer_chunks, self.prefetch, self.device = max(1, buffer_chunks), max(1, prefetch), device

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def _buffers(self, epoch: int) -> Iterator[torch.Tensor]:
        """The epoch's buffers, each a float32 tensor of permuted rows (runs in the reader thread)."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.chunks))
        for i in range(0, len(order), self.buffer_chunks):
            parts = [self.cache.read(*self.chunks[j]) for j in order[i:i + self.buffer_chunks]]
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            perm = rng.permutation(len(rows))
            yield torch.from_numpy(rows[perm].astype(np.float32, copy=False))

    def _prefetched(self, epochs: Iterator[int]) -> Iterator[torch.Tensor]:
        """Buffers of the given epochs, read ahead by a background thread."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for e in epochs:
                    for buf in self._buffers(e):
                        if not put(buf):
                            return
                put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                put(exc)

        t = threading.Thread(target=produce, daemon=True, name="activation-reader")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _batches(self, buffers: Iterator[torch.Tensor], drop_last: bool) -> Iterator[torch.Tensor]:
        carry = None
        for buf in buffers:
            if carry is not None and len(carry):
                buf = torch.cat([carry, buf])
            n_full = len(buf) // self.batch_size * self.batch_size
            for i in range(0, n_full, self.batch_size):
                yield buf[i:i + self.batch_size].to(self.device, non_blocking=True)
            carry = buf[n_full:]
        if not drop_last and carry is not None and len(carry):
            yield carry.to(self.device)

    def epoch(self, epoch: int = 0) -> Iterator[torch.Tensor]:
        """Every row of the range exactly once (the last batch may be short)."""
        return self._batches(self._prefetched(iter([epoch])), drop_last=False)

    def stream(self) -> Iterator[torch.Tensor]:
        """Full batches forever, epoch after epoch (rows left at an epoch's end start the next)."""
        import itertools

        return self._batches(self._prefetched(itertools.count()), drop_last=True)

    def sequential(self, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """Rows in order, in batches (for evaluation)."""
        stop = self.stop if max_rows is None else min(self.stop, self.start + max_rows)
        for i in range(self.start, stop, self.batch_size):
            yield torch.from_numpy(self.cache.read(i, min(i + self.batch_size, stop)).astype(np.float32)).to(self.device)
