"""Opening a store with and without consolidated metadata, through a store that counts its
operations and adds a fixed latency to each (as an object store would): zarr's group walk, the
explorer's open, `xarray.open_zarr` and `xarray.open_datatree`.

    .venv/bin/python benchmarks/bench_store_open.py [STORE] [--latency-ms 20]

Without STORE it builds a small store (tiny random GPT-2). The counts depend only on the number of
arrays, not on their size; the times are ratios against the same open without consolidation.
"""
from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import zarr
from zarr.storage import LocalStore, WrapperStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers


class SlowCountingStore(WrapperStore):
    """Counts get / list / exists calls and sleeps `latency` seconds in each."""

    def __init__(self, store, latency: float = 0.0):
        super().__init__(store)
        self.latency, self.counts = latency, Counter()

    def _with_store(self, store):
        return type(self)(store, self.latency)

    async def get(self, key, prototype, byte_range=None):
        self.counts["get"] += 1
        await asyncio.sleep(self.latency)
        return await self._store.get(key, prototype=prototype, byte_range=byte_range)

    async def exists(self, key):
        self.counts["exists"] += 1
        await asyncio.sleep(self.latency)
        return await self._store.exists(key)

    async def list_dir(self, prefix):
        self.counts["list"] += 1
        await asyncio.sleep(self.latency)
        async for k in self._store.list_dir(prefix):
            yield k

    async def list_prefix(self, prefix):
        self.counts["list"] += 1
        await asyncio.sleep(self.latency)
        async for k in self._store.list_prefix(prefix):
            yield k


def openers():
    import xarray as xr

    from neuron_embeddings.storage import schema

    def walk(s, consolidated):
        g = zarr.open_group(s, mode="r", use_consolidated=consolidated)
        return [g[a.path].shape for a in schema.ARRAYS if a.path in g]

    return {
        "zarr: every array's shape": walk,
        "xarray.open_zarr (root)": lambda s, c: xr.open_zarr(s, consolidated=c, chunks=None),
        "xarray.open_datatree": lambda s, c: xr.open_datatree(s, engine="zarr", consolidated=c, chunks=None),
    }


def measure(path: str, latency: float) -> list[tuple[str, bool, dict, float]]:
    rows = []
    for name, fn in openers().items():
        for consolidated in (False, True):
            s = SlowCountingStore(LocalStore(path, read_only=True), latency)
            t0 = time.perf_counter()
            fn(s, consolidated)
            rows.append((name, consolidated, dict(s.counts), time.perf_counter() - t0))
    return rows


def small_store(d: Path) -> str:
    from neuron_embeddings.core.synthetic import build_random_gpt2
    from tests.helpers import options, run_stages

    m = str(build_random_gpt2(d / "m", n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=600, seed=0))
    out = str(d / "s.zarr")
    run_stages(out, **options(m))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", nargs="?")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp())
    src = a.store or small_store(tmp)
    path = str(tmp / "copy.zarr")
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("c"))  # metadata only; never touch the user's store
    zarr.consolidate_metadata(path)
    rows = measure(path, a.latency_ms / 1000)
    print(f"{src}: {len(list(Path(path).rglob('zarr.json')))} zarr.json files, latency {a.latency_ms:g} ms per operation")
    base = {}
    for name, consolidated, counts, secs in rows:
        if not consolidated:
            base[name] = secs
        ops = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"  {name:28s} consolidated={consolidated!s:5s} {ops:32s} {secs:6.2f} s  "
              f"({secs / base[name]:.2f}x the unconsolidated open)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
