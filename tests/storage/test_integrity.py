"""Verified completeness: markers record the chunks their shard wrote; `status --verify` finds a
deleted, a truncated or a changed chunk and a lost array `zarr.json`; a rerun recomputes what is
damaged (and what depends on it) to the identical store. The state beside the store (markers,
progress) keeps Zarr tools quiet, and stores with markers in the old place still resume."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from neuron_embeddings.cli import main
from neuron_embeddings.storage.store import Store
from neuron_embeddings.storage import schema
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.registry import run_status
from tests.helpers import copy_store, marker_root, options, run_stages, state_dir

SMALL = dict(n_sequences=8, ctx_len=16, k=4)  # 2 layers x 4 shards of 64 neurons, 1 scan block


def all_arrays(out: str) -> dict[str, np.ndarray]:
    """Every array of a store, read whole (what 'the identical store' compares)."""
    g = zarr.open_group(out, mode="r")
    return {name: a[...] for name, a in g.members(max_depth=None) if isinstance(a, zarr.Array)}


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # NaN == NaN here


@pytest.fixture(scope="module")
def reference(tiny_gpt2, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    run_stages(out, **options(tiny_gpt2, **SMALL))
    return out, all_arrays(out)


def _chunk(out: str, array: str, row: int = 0) -> Path:
    """The chunk file of `array` for the first neuron shard of store row `row`."""
    p = Path(out, array, "c", str(row), *["0"] * (zarr.open_array(out, path=array).ndim - 1))
    assert p.is_file(), p
    return p


def _delete(out):
    _chunk(out, "embeddings").unlink()
    return "embed/L00-N00000", "embeddings/c/0/0/0/0 is missing"


def _truncate(out):
    p = _chunk(out, "clusters/labels", row=1)
    p.write_bytes(p.read_bytes()[:-7])
    return "cluster/L01-N00000", "clusters/labels/c/1/0/0 has"


def _lose_metadata(out):
    Path(out, "topk/act/zarr.json").unlink()
    return "array topk/act", "zarr.json is missing"


def _garble_metadata(out):
    Path(out, "clusters/linkage/zarr.json").write_text('{"zarr_format": 3, "node_')
    return "array clusters/linkage", "zarr.json is unreadable"


@pytest.mark.parametrize("damage", [_delete, _truncate, _lose_metadata, _garble_metadata])
def test_damage_is_found_by_verify_and_repaired_by_a_rerun(capsys, tiny_gpt2, tmp_path, reference, damage):
    ref, want = reference
    out = str(tmp_path / "s.zarr")
    copy_store(ref, out)
    assert main(["status", "--verify", out]) == 0
    capsys.readouterr()
    what, words = damage(out)
    assert main(["status", "--verify", out]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    bad = [l for l in lines if l.startswith("damaged")]
    assert len(bad) == 1 and what in bad[0] and words in bad[0], lines
    assert "1 damaged" in lines[-1]
    run_stages(out, **options(tiny_gpt2, **SMALL))  # the resume path finds and recomputes it
    assert_identical(all_arrays(out), want)
    assert main(["status", "--verify", out]) == 0
    st = run_status(out)
    assert st.pending == 0 and st.failed == 0


def test_a_changed_chunk_of_the_same_size_fails_its_checksum(capsys, reference, tmp_path):
    ref, _ = reference
    out = str(tmp_path / "s.zarr")
    copy_store(ref, out)
    p = _chunk(out, "topk/act")
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    assert main(["status", "--verify", out]) == 1
    assert "damaged  embed/L00-N00000: chunk topk/act/c/0/0/0 does not match its checksum" in capsys.readouterr().out


def test_markers_record_every_chunk_their_shard_wrote(reference):
    ref, _ = reference
    rec = json.loads((marker_root(ref) / "cluster" / "L01-N00064.done").read_text())
    want = {f"{spec.path}/c/1/1/0" + "/0" * (len(spec.dims) - 3)
            for spec in (schema.LABELS, schema.LINKAGE)} | {f"{schema.METRIC_ARRAYS[m].path}/c/1/1"
                                                            for m in schema.METRICS}
    assert set(rec["chunks"]) == want
    size, crc = rec["chunks"]["clusters/labels/c/1/1/0"]
    import google_crc32c

    data = Path(ref, "clusters/labels/c/1/1/0").read_bytes()
    assert size == len(data) and crc == google_crc32c.value(data)


def test_recreated_metadata_is_what_the_store_was_made_with(reference):
    from neuron_embeddings.storage.store import schema_metadata

    ref, _ = reference
    attrs = Store(ref).attrs
    for spec in schema.ARRAYS:
        if Path(ref, spec.path, "zarr.json").exists():
            assert json.loads(schema_metadata(attrs, spec)) == json.loads(Path(ref, spec.path, "zarr.json").read_text())


def test_walking_the_group_warns_nothing(reference, tmp_path):
    ref, _ = reference
    out = str(tmp_path / "s.zarr")
    copy_store(ref, out)
    Store(out).write_explorer_cache("x.bin", b"x")
    Store(out).write_progress("scan", "B000", 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = zarr.open_group(out, mode="r")
        assert len(dict(g.members(max_depth=None))) > 20
        g.tree()


def test_state_of_a_deleted_store_is_not_taken_for_a_new_one(tiny_gpt2, tmp_path, reference):
    out = str(tmp_path / "s.zarr")
    copy_store(reference[0], out)
    shutil.rmtree(out)  # the user deletes the store (its state beside it stays) and runs again
    run_stages(out, **options(tiny_gpt2, **SMALL))
    assert_identical(all_arrays(out), reference[1])
    records = [json.loads(p.read_text()) for p in marker_root(out).rglob("*.done")]
    assert records and all(not r["skipped"] for r in records)


def _as_old_layout(out: str) -> None:
    """What versions before the state directory wrote: markers and progress inside the store, no store_id."""
    shutil.move(marker_root(out), Path(out, "_markers"))
    shutil.move(state_dir(out) / "progress", Path(out, "_progress"))
    shutil.rmtree(state_dir(out))
    g = zarr.open_group(out, mode="r+")
    attrs = {k: v for k, v in g.attrs.items() if k != "store_id"}
    g.attrs.clear()
    g.attrs.update(attrs)


@pytest.mark.filterwarnings("ignore:Object at _:UserWarning")  # the old layout: what the move fixes
def test_a_store_with_markers_in_the_old_place_resumes(tiny_gpt2, tmp_path, reference):
    out = str(tmp_path / "old.zarr")
    opts = options(tiny_gpt2, **SMALL)
    run_stages(out, stages=("scan", "embed"), **opts)
    _as_old_layout(out)
    before = {p: p.read_bytes() for p in Path(out, "_markers").rglob("*.done")}
    st = run_status(out)
    assert st.count("complete", "embed") == 8 and st.count("pending", "cluster") == 8
    run_stages(out, **opts)
    assert_identical(all_arrays(out), reference[1])
    assert {p: p.read_bytes() for p in Path(out, "_markers").rglob("*.done")} == before  # nothing redone
    assert {p.parent.name for p in marker_root(out).rglob("*.done")} == {"cluster", "centroids", "logits", "similar"}
    st = run_status(out)
    assert st.pending == 0 and st.failed == 0
    # damage in the old layout's shards is found too (they have records) and repaired
    _chunk(out, "embeddings", row=1).unlink()
    run_stages(out, **opts)
    assert_identical(all_arrays(out), reference[1])


def test_a_store_that_reads_first_records_what_it_then_writes(reference, tmp_path):
    """A unit reads (a read-only group, its arrays cached), then writes: the writes go through
    the recording group, so its marker lists the chunks, and the data is what was written."""
    out = str(tmp_path / "copy.zarr")
    copy_store(reference[0], out)
    store = Store(out)
    region = (0, slice(0, 64))
    labels = st.read(store, schema.LABELS, region)  # opens the read-only group and caches the array
    st.write(store, schema.LABELS, region, labels + 1)
    assert "clusters/labels/c/0/0/0" in store.written_chunks()
    np.testing.assert_array_equal(st.read(Store(out), schema.LABELS, region), labels + 1)
    assert st.read(store, schema.LABELS, region).tolist() == (labels + 1).tolist()  # this Store reads it back too
