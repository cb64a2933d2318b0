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
