"""The flow end to end on a real Prefect server (test harness): a run, a resumed run, a failed shard."""
from __future__ import annotations

from pathlib import Path

import pytest

from neuron_embeddings.flows.run import ShardsFailed, neuron_embeddings_run
from neuron_embeddings.tasks.registry import run_status
from tests.helpers import assert_same_arrays, contract_arrays, marker_root, options, run_stages

FLOW_OPTS = dict(n_sequences=24, ctx_len=32, k=6, shard_size=64, embedding_dtype="float32", device="cpu",
                 batch_size=8)


def _marker_mtimes(out: str) -> dict:
    return {str(p.relative_to(marker_root(out))): p.stat().st_mtime_ns for p in marker_root(out).rglob("*.done")}


@pytest.fixture(scope="module")
def reference(tiny_gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    run_stages(out, **options(tiny_gpt2))
    return contract_arrays(out)


def test_flow_run_then_resume(prefect_server, tiny_gpt2, tmp_path, reference):
    out = str(tmp_path / "flow.zarr")
    state = neuron_embeddings_run(out=out, model=tiny_gpt2, **FLOW_OPTS, return_state=True)
    summary = state.result()
    st = run_status(out)
    assert st.failed == 0 and st.pending == 0 and st.complete == 1 + 1 + 8 * 5  # prepare, scan, 8 shards x 5 stages
    assert [r["layer"] for r in summary["layers"]] == [0, 1]
    assert_same_arrays(reference, contract_arrays(out))  # the flow writes what the stages compute
    _check_artifacts(summary, state.state_details.flow_run_id)
    assert _consolidated(out)  # a complete run consolidates the store's metadata
    _check_shard_logs(out)
    scan = _marker_records(out, "scan")
    # one scan block, its shards in this process: its tables went to the embed stage in memory,
    # and no chunk of the scan's partial tables was ever written
    assert [r.get("tables") for r in scan] == ["memory"]
    assert not [key for key in scan[0]["chunks"] if key.startswith("scan/")], scan[0]["chunks"]
    before = _marker_mtimes(out)
    neuron_embeddings_run(out=out, model=tiny_gpt2, **FLOW_OPTS)  # resume: nothing left to do
    assert _marker_mtimes(out) == before
    assert_same_arrays(reference, contract_arrays(out))


def _consolidated(out: str) -> bool:
    import zarr

    return zarr.open_group(out, mode="r").metadata.consolidated_metadata is not None


def _latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.UPDATED_DESC, limit=1)
    assert arts, f"no artifact {key!r}"
    return arts[0]


def _check_artifacts(summary: dict, flow_run_id) -> None:
    """The run the user started (not its subflow) has every stage's progress card, complete and
    saying how many shards, the per-layer table and the report with both rankings."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key = {a.key: a for a in arts}
    stages = ("scan", "embed", "cluster", "centroids", "logits", "similar")
    assert {f"{s}-progress" for s in stages} | {"layer-summary", "polysemanticity-report"} <= set(by_key), sorted(by_key)
    for stage in stages:
        card = by_key[f"{stage}-progress"]
        assert float(card.data) == 100.0, stage
        assert card.description == (f"{stage}: 8 of 8 shards complete" if stage != "scan"
                                    else "scan: 1 of 1 blocks complete, 24 of 24 sequences"), card.description
    table = by_key["layer-summary"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["layer"] for r in rows] == [0, 1]
    assert [r["mean_clusters"] for r in rows] == [r["mean_clusters"] for r in summary["layers"]]
    report = by_key["polysemanticity-report"].data
    for key in ("most_polysemantic", "least_polysemantic"):
        top = summary[key][0]
        assert f"| L{top['layer']} N{top['neuron']} |" in report, key
    assert "most and least" in by_key["polysemanticity-report"].description
    assert float(_latest_artifact("scan-b0000").data) == 100.0  # the block's own card, on its task run


def test_shards_two_at_a_time_in_a_batch(prefect_server, tiny_gpt2, tmp_path, reference):
    """Small shards: batches of several shards, each run two at a time in threads (tasks.shards);
    the same store, and every shard's timing in the UI's logs."""
    import os

    from neuron_embeddings.tasks.shards import shard_batches, shard_threads

    assert shard_threads() == min(2, os.cpu_count() or 1)  # 2 here: this machine has 2 cores
    out = str(tmp_path / "threads.zarr")
    neuron_embeddings_run(out=out, model=tiny_gpt2, **{**FLOW_OPTS, "shard_size": 16})
    st = run_status(out)
    assert st.failed == 0 and st.pending == 0 and len(st.units["embed"]) == 32
    batches = shard_batches([{"id": i} for i in range(32)], 1)
    assert [s["id"] for b in batches for s in b] == list(range(32)) and max(map(len, batches)) > 2
    assert_same_arrays(reference, contract_arrays(out))
    _check_shard_logs(out)


def _check_shard_logs(out: str) -> None:
    """The UI has a log line with the timing of every shard of every stage (from the shard threads
    of each batch task too), under the latest shards subflow run."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    from neuron_embeddings.storage.store import Store
    from neuron_embeddings.tasks.registry import stage_units

    APILogHandler().flush()
    store = Store(out)
    s, d_mlp = store.settings(), int(store.attrs["d_mlp"])
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["neuron-embeddings-shards"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        logs, page = [], None
        while page is None or len(page) == 200:  # the API's page size limit
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200,
                                    offset=len(logs))
            logs += page
    timed = {m.groups() for m in (re.match(r"(\w+) (\S+): done in \d+\.\d+ s", log.message) for log in logs) if m}
    for stage in ("scan", "embed", "cluster", "centroids", "similar"):
        for unit in stage_units(stage, s, d_mlp):
            assert (stage, unit) in timed, f"no timing log for {stage} {unit}"
    assert all(log.task_run_id is not None for log in logs if "done in" in log.message)


def test_failed_shard_is_named_and_only_it_is_rerun(prefect_server, tiny_gpt2, tmp_path, reference, monkeypatch):
    out = str(tmp_path / "fault.zarr")
    monkeypatch.setenv("NE_TEST_FAULT", "embed/L01-N00064")
    with pytest.raises(ShardsFailed, match="L01-N00064"):
        neuron_embeddings_run(out=out, model=tiny_gpt2, **FLOW_OPTS)
    monkeypatch.delenv("NE_TEST_FAULT")
    st = run_status(out)
    assert st.units["embed"]["L01-N00064"] == "failed"
    assert st.units["cluster"]["L01-N00064"] == "pending"
    assert st.units["centroids"]["L01-N00064"] == "pending"
    assert st.failed == 1 and st.pending == 3 + 8  # every other shard completed; similar needs them all
    assert not _consolidated(out)  # consolidated only once complete
    # the scan had kept its tables in memory; on the way out the rows not yet embedded were
    # written, so that the rerun below need not rescan
    scan = _marker_records(out, "scan")
    assert [r.get("tables") for r in scan] == [None]
    assert any(key.startswith("scan/x/") for key in scan[0]["chunks"])
    before = _marker_mtimes(out)
    neuron_embeddings_run(out=out, model=tiny_gpt2, **FLOW_OPTS)
    after = _marker_mtimes(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"embed/L01-N00064.done", "cluster/L01-N00064.done", "centroids/L01-N00064.done",
                       "logits/L01-N00064.done"} | {
        f"similar/{u}.done" for u in st.units["similar"]}
    assert run_status(out).failed == 0 and _consolidated(out)
    assert not [p for p in (Path(out) / "scan").rglob("*")  # no scratch left
                if p.is_file() and p.name != "zarr.json" and p.relative_to(Path(out) / "scan").parts[0] != "max"]
    assert_same_arrays(reference, contract_arrays(out))


def test_two_dask_worker_processes_give_the_same_store(prefect_server, tiny_gpt2, tmp_path, reference):
    out = str(tmp_path / "dask.zarr")
    neuron_embeddings_run(out=out, model=tiny_gpt2, workers=2, **FLOW_OPTS)
    st = run_status(out)
    assert st.failed == 0 and st.pending == 0
    assert len(st.units["scan"]) == 2  # two data-parallel scan blocks
    for stage in ("scan", "embed", "cluster"):  # both the scan blocks and the neuron shards spread over both
        assert len({record["worker"] for record in _marker_records(out, stage)}) == 2, stage
    assert_same_arrays(reference, contract_arrays(out))


def _marker_records(out: str, stage: str) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in (marker_root(out) / stage).glob("*.done")]


def test_task_retries_absorb_a_transient_fault(prefect_server, tiny_gpt2, tmp_path, reference, monkeypatch):
    out = str(tmp_path / "retry.zarr")
    monkeypatch.setenv("NE_TEST_FAULT", "cluster/L00-N00128:once")
    monkeypatch.setenv("NE_TEST_FAULT_DIR", str(tmp_path))
    neuron_embeddings_run(out=out, model=tiny_gpt2, task_retries=1, **FLOW_OPTS)
    assert (tmp_path / "cluster-L00-N00128").exists()  # the fault did fire once
    st = run_status(out)
    assert st.failed == 0 and st.pending == 0
    assert_same_arrays(reference, contract_arrays(out))


def test_no_similar_leaves_that_stage_out(prefect_server, tiny_gpt2, tmp_path, reference):
    import zarr

    out = str(tmp_path / "nosim.zarr")
    neuron_embeddings_run(out=out, model=tiny_gpt2, similar=False, **FLOW_OPTS)
    st = run_status(out)
    assert st.units["similar"] == {} and st.failed == 0 and st.pending == 0
    assert st.complete == 1 + 1 + 8 * 4  # prepare, scan, 8 shards x (embed, cluster, centroids, logits)
    assert (zarr.open_group(out, mode="r")["similar/neighbours"][...] == -1).all()
    assert_same_arrays(reference, contract_arrays(out))


@pytest.mark.parametrize("bad", [{"batch_size": -4}, {"batch_size": 0}, {"workers": 0}, {"task_retries": -1}])
def test_flow_refuses_bad_execution_settings_before_the_store_exists(prefect_server, tiny_gpt2, tmp_path, bad):
    from neuron_embeddings.core.errors import UserError

    out = tmp_path / "flow.zarr"
    with pytest.raises(UserError, match=f"--{next(iter(bad)).replace('_', '-')}"):
        neuron_embeddings_run(out=str(out), model=tiny_gpt2, **{**FLOW_OPTS, **bad})
    assert not out.exists()


def test_tables_kept_in_memory_give_the_store_of_written_ones_with_strata(prefect_server, tiny_gpt2, tmp_path):
    """The flow's scan hands its tables to the embed stage in memory (one block, shards in this
    process); the stages run one by one write and read them back: the same store, strata and
    activation distributions included."""
    import zarr

    strata = dict(strata="0.5,0", strata_k=3, similar=False)
    ref = str(tmp_path / "written.zarr")
    run_stages(ref, **options(tiny_gpt2, **strata))
    out = str(tmp_path / "kept.zarr")
    neuron_embeddings_run(out=out, model=tiny_gpt2, **FLOW_OPTS, **strata)
    assert [r.get("tables") for r in _marker_records(out, "scan")] == ["memory"]
    names = [f"strata/{n}" for n in ("seq", "pos", "act", "stratum", "embeddings", "window")] + [
        f"distribution/{n}" for n in ("hist", "positive_fraction", "mean", "max")]
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(out, mode="r")
    assert_same_arrays({n: a[n][...] for n in names}, {n: b[n][...] for n in names})
    assert_same_arrays(contract_arrays(ref), contract_arrays(out))
