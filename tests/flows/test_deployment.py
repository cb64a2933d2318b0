"""prefect.yaml end to end, the way a user runs it: on a real Prefect server (the test harness), the
real CLI creates the process work pool and deploys every deployment in prefect.yaml, a run of the
`demo` deployment is created (CI-sized parameters: a tiny random GPT-2, a transient fault in one
shard), a real process worker started from another directory runs it and the flow run fails naming
the shard; Prefect's Retry (`prefect flow-run retry`) and the worker again complete it, computing
only that shard, and the store equals the stages run in-process."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_embeddings.tasks.registry import run_status
from tests.helpers import assert_same_arrays, contract_arrays, marker_root, options, run_stages

REPO = Path(__file__).resolve().parents[2]
POOL = "neuron-embeddings"
CI_PARAMS = dict(dataset="builtin:python-docs", n_sequences=16, ctx_len=32, k=4, shard_size=64, device="cpu",
                 embedding_dtype="float32", batch_size=8)


def _prefect(args: list[str], env: dict, cwd: Path, timeout: float, log: Path | None = None) -> str:
    """Run the `prefect` CLI of this interpreter; return its output, fail the test with it on error.
    It runs in its own process group, so that a timeout ends it and the processes it started."""
    cmd = [sys.executable, "-m", "prefect", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"`prefect {' '.join(args)}` timed out after {timeout} s:\n{output[-4000:]}")
    if log is not None:
        log.write_text(output)
    if proc.returncode != 0:
        pytest.fail(f"`prefect {' '.join(args)}` exited with {proc.returncode}:\n{output[-4000:]}")
    return output


def _env(api_url: str, cwd: Path) -> dict:
    env = dict(os.environ)  # conftest's PREFECT_HOME, results path, offline switches
    env.update(PREFECT_API_URL=api_url, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PWD=str(cwd))  # what a shell started in `cwd` would export; `prefect deploy` reads {{ $PWD }}
    return env


def test_prefect_yaml_deploys_and_a_process_worker_runs_it(prefect_server, tiny_gpt2, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()  # the harness server, reachable from other processes
    assert api_url and api_url.startswith("http"), api_url

    # The walkthrough's commands, from the project directory.
    _prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], _env(api_url, REPO), REPO, 60)
    _prefect(["--no-prompt", "deploy", "--all"], _env(api_url, REPO), REPO, 120)

    with get_client(sync_client=True) as client:
        demo = client.read_deployment_by_name("neuron-embeddings/demo")
        weekly = client.read_deployment_by_name("neuron-embeddings/gpt2-small-full")
        # the pull step recorded where the code is, so a worker started anywhere finds it
        assert demo.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert demo.work_pool_name == POOL and demo.entrypoint == "flows/run.py:neuron_embeddings_run"
        assert demo.parameters["model"] == "builtin:all-MiniLM-L6-v2"
        assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]
        assert weekly.parameters["model"] == "gpt2" and weekly.parameters.get("layers") is None
        sae = client.read_deployment_by_name("neuron-embeddings-sae/gpt2-small-sae")
        assert sae.entrypoint == "flows/sae.py:sae_flow" and sae.work_pool_name == POOL
        for d in (weekly, sae):
            client.delete_deployment(d.id)  # no scheduled GPT-2 runs left on the shared test server

    # A run of the deployment with CI-sized parameters (they override the deployment's), with a
    # transient fault in one shard (its first attempt fails): the flow run fails, naming it.
    out = tmp_path / "deployed.zarr"
    params = dict(CI_PARAMS, out=str(out), model=tiny_gpt2)
    created = _prefect(["deployment", "run", "neuron-embeddings/demo", "--params", json.dumps(params)],
                       _env(api_url, REPO), REPO, 60)
    match = re.search(r"UUID: ([0-9a-f-]{36})", created)
    assert match, created
    flow_run_id = match.group(1)

    # A real process worker, started outside the project: it takes the run, runs the pull step and
    # the flow in a subprocess, and exits when the run is over.
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    worker_log = tmp_path / "worker.log"

    flags = tmp_path / "fault-flags"
    flags.mkdir()
    # the test's fault switch lives in the worker's environment, never in the deployment's parameters
    worker_env = dict(_env(api_url, worker_dir), NE_TEST_FAULT="embed/L01-N00064:once", NE_TEST_FAULT_DIR=str(flags))

    def run_worker_once() -> object:
        _prefect(["worker", "start", "--pool", POOL, "--run-once"], worker_env, worker_dir, 240, log=worker_log)
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state

    state = run_worker_once()
    assert state is not None and state.is_failed(), f"{state!r}; worker log:\n{worker_log.read_text()[-4000:]}"
    assert "L01-N00064" in worker_log.read_text()
    st = run_status(str(out))
    assert st.units["embed"]["L01-N00064"] == "failed" and st.failed == 1, st
    before = _marker_mtimes(out)

    # Prefect's Retry on the failed flow run (the UI's button; here its CLI): the worker runs it
    # again and only the failed shard (and what needs it) is computed.
    _prefect(["flow-run", "retry", flow_run_id], _env(api_url, REPO), REPO, 60)
    state = run_worker_once()
    assert state is not None and state.is_completed(), f"{state!r}; worker log:\n{worker_log.read_text()[-4000:]}"
    after = _marker_mtimes(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert {k for k in changed if not k.startswith("similar/")} == {
        "embed/L01-N00064.done", "cluster/L01-N00064.done", "centroids/L01-N00064.done", "logits/L01-N00064.done"}

    st = run_status(str(out))
    assert st.failed == 0 and st.pending == 0 and st.complete == 1 + 1 + 8 * 5, st
    assert not (out / "_faults").exists() and (flags / "embed-L01-N00064").exists()  # nothing of it in the store
    _check_cards_on_the_run(flow_run_id)

    ref = tmp_path / "reference.zarr"
    run_stages(str(ref), **options(tiny_gpt2, n_sequences=16, k=4))
    assert_same_arrays(contract_arrays(str(ref)), contract_arrays(str(out)))


def _check_cards_on_the_run(flow_run_id: str) -> None:
    """The deployment's flow run (the one `prefect deployment run` printed and the UI opens) has
    each stage's progress card once, complete after the retry, and the summary and report."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    keys = [a.key for a in arts if a.key]  # unkeyed: Prefect's records of persisted results
    progress = sorted(k for k in keys if k.endswith("-progress"))
    assert progress == sorted(f"{s}-progress" for s in ("scan", "embed", "cluster", "centroids", "logits", "similar")), \
        [(a.key, a.type, a.description) for a in arts]
    assert all(float(a.data) == 100.0 for a in arts if a.key in progress)
    assert {"layer-summary", "polysemanticity-report"} <= set(keys), keys


def _marker_mtimes(out: Path) -> dict:
    return {str(p.relative_to(marker_root(out))): p.stat().st_mtime_ns for p in marker_root(out).rglob("*.done")}
