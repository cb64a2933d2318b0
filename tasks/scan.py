"""The `scan` stage: one data-parallel block of sequences through the model (core.scan), its
partial top-k tables written to the store (whole chunks of this block only), or kept in memory for
the embed stage where the run's one block and its shards share this process (tasks.kept)."""
from __future__ import annotations

import time

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.plan import block_id
from neuron_embeddings.core.resources import available_memory
from neuron_embeddings.core.scan import NO_SEQ, SlotTable, Spectrum, scan_sequences
from neuron_embeddings.core.settings import strata_intervals
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.blocks import block_inputs
from neuron_embeddings.tasks.common import run_unit
from neuron_embeddings.tasks.kept import KEEP_MAX_S, KeptScan, PoolRows, keep, keep_wanted, write_row


@task(name="scan-block", task_run_name="scan-B{block[index]}", cache_policy=NO_CACHE)
def scan_block(out: str, block: dict, device: str = "auto", batch_size: int = 16) -> dict:
    """Forward passes over the block, a running top-k with x per unit, partial tables to the store."""
    def work(store: st.Store) -> dict:
        b = block_inputs(store, block, "scan", device)
        s, tokens = b.settings, b.tokens_ST
        gmax = torch.from_numpy(st.read_maxima(store)) if s.needs_maxima else None  # [L, M], all blocks
        emb_dtype = getattr(torch, s.embedding_dtype)
        spectrum = None
        if s.strata:
            spectrum = Spectrum.empty(strata_intervals(s.strata), len(s.layers), b.units.n_units, s.strata_k,
                                      b.units.d_input, emb_dtype, b.lm.device, st.window(store))
        t0, timings = time.perf_counter(), {}
        tables = scan_sequences(b.lm.bridge, tokens, block["start"], list(s.layers), s.k, emb_dtype, batch_size,
                                b.lm.device, mode="top" if s.band_fraction is None else "band", gmax_LM=gmax,
                                fraction=s.band_fraction, seed=s.seed, progress=b.report,
                                window=st.window(store), units=b.units,
                                excluded_ids=s.excluded_token_ids, spectrum=spectrum, timings=timings)
        t_model = time.perf_counter() - t0
        examples = s.k + (len(spectrum.intervals) * s.strata_k if spectrum is not None else 0)
        x_bytes = len(tables) * b.units.n_units * examples * b.units.d_input * torch.finfo(emb_dtype).bits // 8
        kept = KeptScan(block["index"], b.units.n_units) if _keeps(out, s, t_model, x_bytes) else None
        for row, table in enumerate(tables):  # layer by layer: one layer's x table at a time
            tables[row] = None
            # kept: x stays in the pool until each shard gathers its own, where the pool holds no
            # more rows than the x tables would (below its cap: fewer tokens than slots)
            lazy = kept is not None and table.pool.used <= sum(t.xref.numel() for t in table.pool.tables)
            parts = {"top": _table_fields(table, lazy)}
            if spectrum is not None:
                strata = [_table_fields(t, lazy) for t in spectrum.tables[row]]
                spectrum.tables[row] = None
                join = lambda name: PoolRows.concat if lazy and name == "x" else _concat  # noqa: E731
                parts.update(strata={name: join(name)([t[name] for t in strata]) for name in strata[0]},
                             hist=spectrum.hist[row].cpu().numpy(), sum=spectrum.sum[row].cpu().numpy())
                del strata
            table.pool.release()  # the row's pool (shared with its strata tables) goes now, or with its PoolRows
            if kept is not None:
                kept.rows[row] = parts
                continue
            write_row(store, block["index"], row, parts)
            del parts
        if spectrum is not None:
            if kept is not None:
                kept.count = spectrum.count
            else:
                st.write_block_count(store, block["index"], spectrum.count)
        if kept is not None:
            keep(out, kept)
        return {"sequences": len(tokens), "tokens": int(tokens.size), "model_seconds": round(t_model, 3),
                "bookkeeping_seconds": round(timings["bookkeeping_seconds"], 3),
                **{key: timings[key] for key in ("pool_rows_max", "pool_cap", "pools_full") if key in timings},
                **({"tables": "memory"} if kept is not None else {})}

    return run_unit(out, "scan", block_id(block["index"]), work)


def _keeps(out: str, s, scan_seconds: float, x_bytes: int) -> bool:
    """Keep the partial tables in memory for the embed stage (tasks.kept) rather than write them:
    the run's only scan block, its shards in this process, a scan short enough to redo, and room
    for its x tables (`x_bytes`) through the shard phase beside what is in use now."""
    if not (s.scan_blocks == 1 and keep_wanted(out) and scan_seconds <= KEEP_MAX_S):
        return False
    free = available_memory("cpu")
    return free is None or free >= x_bytes


def _concat(fields: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(fields, axis=1)


def _table_fields(table: SlotTable, lazy_x: bool = False) -> dict[str, np.ndarray | PoolRows]:
    """A slot table's fields as NumPy arrays in slot order ([M, k(, D or W)]), -1 for no sequence;
    with `lazy_x`, x as `PoolRows` (left in the pool, gathered where read)."""
    parts = {}
    for name in st.SCAN_FIELDS:
        if name == "x" and lazy_x:
            parts[name] = PoolRows(table.pool.data, table.xref.cpu().numpy())
            continue
        data = (getattr(table, name) if name in ("x", "win") else table.by_slot(name)).cpu()
        if name in ("seq", "pos"):
            data = torch.where(data == NO_SEQ, torch.full_like(data, -1), data).to(torch.int32)
        parts[name] = data.numpy()
    return parts
