"""The scan's tables kept in memory (tasks.kept): regions as the store would give them, rows dropped
once embedded, and nothing handed out once the run is ending."""
from __future__ import annotations

import numpy as np
import pytest

from neuron_embeddings.tasks.kept import KeptScan, keep, keep_wanted, kept_scan, keeping_scan_tables


def _kept(n_units: int = 8) -> KeptScan:
    kept = KeptScan(0, n_units)
    for row in range(2):
        kept.rows[row] = {"top": {"key": np.arange(n_units * 3, dtype=np.float64).reshape(n_units, 3) + 100 * row}}
    return kept


def test_a_region_is_one_block_of_the_row_and_a_row_goes_once_all_of_it_is_embedded():
    kept = _kept()
    part = kept.region((1, slice(4, 8)))["key"]
    assert part.shape == (1, 4, 3)  # [blocks, units, k], as read_block_tables gives it
    np.testing.assert_array_equal(part[0], kept.rows[1]["top"]["key"][4:8])
    kept.embedded_region((1, slice(4, 8)))
    kept.embedded_region((1, slice(4, 8)))  # a shard counted twice (a retry that skipped it) is one shard
    assert 1 in kept.rows
    kept.embedded_region((1, slice(0, 4)))
    assert 1 not in kept.rows and 0 in kept.rows


def test_nothing_is_handed_out_once_the_run_ends(tmp_path):
    out = str(tmp_path / "none.zarr")  # no store: the scan never completed, nothing to write
    with keeping_scan_tables(out, in_process=True):
        assert keep_wanted(out)
        kept = _kept()
        keep(out, kept)
        assert kept_scan(out) is kept
    assert not keep_wanted(out) and kept_scan(out) is None
    with pytest.raises(RuntimeError, match="stopping"):  # a shard thread still running after the run ended
        kept.region((0, slice(0, 4)))
    with keeping_scan_tables(out, in_process=False):
        assert not keep_wanted(out)  # shards elsewhere (Dask): the scan writes its tables


def test_pool_rows_gather_the_x_of_the_units_asked_for_as_the_table_would():
    """A kept table's x left in the scan's pool: any unit slice (and the whole field, as written
    on the way out) equals the table's own gathered x, strata concatenated along the examples."""
    import torch

    from neuron_embeddings.core.scan import SlotTable, XPool
    from neuron_embeddings.tasks.kept import PoolRows

    tables = [SlotTable.empty(6, k, 4, torch.float16) for k in (3, 2)]
    pool = XPool.share(tables)
    pool.add_rows(torch.arange(40, dtype=torch.float16).reshape(10, 4))
    gen = torch.Generator().manual_seed(0)
    for t in tables:
        t.xref = torch.randint(0, pool.used, t.xref.shape, generator=gen)
    lazy = PoolRows.concat([PoolRows(pool.data, t.xref.numpy()) for t in tables])
    want = np.concatenate([t.x.numpy() for t in tables], axis=1)
    np.testing.assert_array_equal(np.asarray(lazy), want)
    np.testing.assert_array_equal(lazy[None, slice(2, 5)], want[None, 2:5])
    pool.release()  # the pool lets go of its rows; the kept x still holds them
    np.testing.assert_array_equal(lazy[None, slice(0, 6)][0], want)
