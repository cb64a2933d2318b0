"""A scan block's partial tables kept in this process's memory for the embed stage, instead of being
written to the store and read back.

Where a run has one scan block and its shards run in the process that scanned (one worker: the
flow's thread runner), the partial tables are the top-k itself, and writing them (2.8 GB for GPT-2
small at k 50; ~5 s) only to read them back and delete them is pure cost. The scan's marker then
records `"tables": "memory"`: the tables are durable only while this run lasts. The flow's
`keeping_scan_tables` context lets the scan keep them and, on the way out with shards still to
embed (a failed shard, Ctrl-C), writes what is left to the store and marks the scan as written, so
a rerun computes only those shards. After a kill nothing is written: the next run's repair
(tasks.registry) sees a scan kept in memory with shards not yet embedded and rescans (the same
tables: the scan is deterministic). A scan that took longer than `KEEP_MAX_S`, or whose x tables
would not fit in the memory available, writes its tables as usual (tasks.scan decides).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from neuron_embeddings.core.plan import block_id
from neuron_embeddings.storage import store as st

KEEP_MAX_S = 600.0  # seconds of scanning beyond which the tables are written (durable) all the same

_WANTED: set[str] = set()  # stores whose run executes its shards in this process
_KEPT: dict[str, "KeptScan"] = {}
_LOCK = threading.Lock()


@dataclass
class PoolRows:
    """A kept table's x field [units, examples, D] left in the scan's pool of MLP inputs: the pool's
    rows `data_ND` and each slot's row `xref_MK` (slot order). Indexing gathers only the units
    asked for, so a shard copies its own x and the scan copies none (copying every layer's x out
    of the pools took ~3.7 s of a 128-sequence SmolLM2 scan). `np.asarray` gives the whole field."""

    data_ND: torch.Tensor
    xref_MK: np.ndarray

    @staticmethod
    def concat(parts: list["PoolRows"]) -> "PoolRows":
        """Several tables sharing one pool (a layer's strata), examples one after the other."""
        assert all(p.data_ND is parts[0].data_ND for p in parts), "tables of different pools"
        return PoolRows(parts[0].data_ND, np.concatenate([p.xref_MK for p in parts], axis=1))

    def __getitem__(self, index) -> np.ndarray:
        xref = self.xref_MK[index]
        rows = self.data_ND.index_select(0, torch.from_numpy(np.ascontiguousarray(xref).reshape(-1)))
        return rows.view(*xref.shape, -1).cpu().numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


@dataclass
class KeptScan:
    """Block `block`'s partial tables, row by row: `top` (and `strata`) field -> [units, ...] as
    the scan writes them (storage.store.write_block_table), `hist` [units, bins] and `sum` [units];
    a row is dropped once every unit of it is embedded."""

    block: int
    n_units: int
    rows: dict[int, dict[str, dict | np.ndarray]] = field(default_factory=dict)
    count: int | None = None  # tokens each row's distribution counted (with --strata)
    embedded: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    closing: bool = False  # the run is ending: its rows are being written to the store

    def region(self, region: tuple, part: str = "top") -> dict[str, np.ndarray]:
        """A shard region's (row, unit slice) tables as `read_block_tables` (part "top") or
        `read_block_strata` (part "strata") returns them: field -> [1 block, S, ...]. Raises once
        the run is ending (a shard still running then fails and is left for the rerun)."""
        row, units = region
        with _LOCK:
            if self.closing:
                raise RuntimeError("the run is stopping: this shard is left for the rerun")
            kept = self.rows[row]
        out = {name: a[None, units] for name, a in kept[part].items()}
        if part == "strata":
            out.update(hist=kept["hist"][None, units], sum=kept["sum"][None, units],
                       count=np.asarray([self.count], dtype=np.int64))
        return out

    def embedded_region(self, region: tuple) -> None:
        """Unit slice `region` of its row is embedded (durably): drop the row once all of it is."""
        row, units = region
        with _LOCK:
            done = self.embedded.setdefault(row, set())
            done.add((units.start, units.stop))
            if sum(b - a for a, b in done) >= self.n_units:
                self.rows.pop(row, None)


def keep_wanted(out: str) -> bool:
    """Whether the shards of the run on `out` run in this process (keeping_scan_tables is active)."""
    return out in _WANTED


def keep(out: str, kept: KeptScan) -> None:
    with _LOCK:
        _KEPT[out] = kept


def kept_scan(out: str) -> KeptScan | None:
    return _KEPT.get(out)


def write_row(store: st.Store, block: int, row: int, parts: dict) -> None:
    """One row of a scan block's tables (`top`, and with --strata `strata`, `hist`, `sum`) to the store."""
    arrays = lambda fields: {name: np.asarray(a) for name, a in fields.items()}  # noqa: E731 - x may be PoolRows
    st.write_block_table(store, block, row, arrays(parts["top"]))
    if "strata" in parts:
        st.write_block_strata(store, block, row, arrays(parts["strata"]), parts["hist"], parts["sum"])


@contextlib.contextmanager
def keeping_scan_tables(out: str, in_process: bool):
    """While a run on `out` lasts: let its scan keep its tables in memory when `in_process` (the
    shards run in this process). On the way out, rows still held (some units not embedded) are
    written to the store and the scan's marker rewritten to say so; then everything is dropped."""
    if in_process:
        _WANTED.add(out)
    try:
        yield
    finally:
        _WANTED.discard(out)
        with _LOCK:  # shards still running (an interrupted run) must not start on tables being written
            kept = _KEPT.get(out)
            if kept is not None:
                kept.closing = True
                rows = sorted(kept.rows.items())
        try:
            if kept is not None and rows:
                _write_kept(out, kept, rows)
        finally:
            with _LOCK:
                _KEPT.pop(out, None)


def _write_kept(out: str, kept: KeptScan, rows: list) -> None:
    """Write `rows` (those still held) to the store as the scan would have, then mark the scan written."""
    store, unit = st.Store(out), block_id(kept.block)
    if not store.is_complete("scan", unit):
        return
    logging.getLogger(__name__).warning(
        "saving the scan's tables of %d layer(s) to the store, so that a rerun need not rescan", len(rows))
    for row, parts in rows:
        write_row(store, kept.block, row, parts)
    if kept.count is not None:
        st.write_block_count(store, kept.block, kept.count)
    record = json.loads(store.marker_record("scan", unit))
    store.mark_complete("scan", unit, {k: v for k, v in record.items() if k not in ("tables", "chunks", "completed")})
