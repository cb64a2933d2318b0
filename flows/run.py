"""The main flow: the registry's stages (tasks.registry) in order, then the summary.

Orchestration only: it plans, maps, waits and reports; the work and the markers live in tasks/.
Every task skips units whose marker says complete, so rerunning the flow (same command, a new
deployment run, or Prefect's Retry) finishes a failed run without redoing complete shards.
"""
from __future__ import annotations

from prefect import flow, unmapped
from prefect.artifacts import ProgressArtifact, update_progress_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from neuron_embeddings.core.settings import ExecSettings, default
from neuron_embeddings.flows.runners import check_dask_address, task_runner
from neuron_embeddings.storage.lock import writer_lock
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.kept import keeping_scan_tables
from neuron_embeddings.tasks.registry import BY_NAME, phases
from neuron_embeddings.tasks.shards import ShardBatchFailed, shard_batch, shard_batches
from neuron_embeddings.tasks.summarise import summarise_task


class ShardsFailed(RuntimeError):
    """Some shards failed; the message names them. Rerun to compute only those."""


def _progress_card(key: str, report_to: str | None):
    """A progress artifact `key` on the flow run `report_to` (None: the current run), and a callable
    (percent, description) that updates it. A retry of that run finds and updates its card."""
    artifact_id = None
    if report_to is not None:
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[report_to]), key=ArtifactFilterKey(any_=[key])), limit=1)
        artifact_id = found[0].id if found else None
    if artifact_id is None:
        artifact_id = ProgressArtifact(key=key, progress=0.0, flow_run_id=report_to).create(_sync=True).id
    return lambda percent, description: update_progress_artifact(artifact_id, percent, description=description)


def _follow(out: str, stages: tuple[str, ...], total: int, futures: list, report_to: str | None = None,
            poll_s: float = 2.0) -> list[str]:
    """Wait for tasks, keeping a progress artifact per stage (`<stage>-progress`: "N of M shards
    complete", or blocks and sequences for the scan) up to date from the store's markers and block
    progress, so the UI moves shard by shard even when a task runs a batch of shards; the cards go
    on the flow run `report_to` (the run the user started). Return a message per failed shard."""
    if not futures:
        return []
    store = Store(out)
    n_sequences = store.settings().n_sequences
    cards = {stage: _progress_card(f"{stage}-progress", report_to) for stage in stages}
    shown: dict[str, str] = {}
    failed: list[str] = []
    pending = list(futures)
    while True:
        done, not_done = wait(pending, timeout=poll_s)
        for f in done:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - collected into one message naming each shard
                msgs = [str(m) for m in e.args] if isinstance(e, ShardBatchFailed) else [str(e)]
                failed += [m if "shard" in m else f"{stages[0]}: {type(e).__name__}: {m}" for m in msgs]
        for stage in stages:
            percent, text = _stage_progress(store, stage, total, n_sequences)
            if text != shown.get(stage) or not not_done:
                shown[stage] = text
                cards[stage](percent, text)
        if not not_done:
            return failed
        pending = list(not_done)


def _stage_progress(store: Store, stage: str, total: int, n_sequences: int) -> tuple[float, str]:
    """(percent, card text) of a stage from its markers; a block stage (scan) counts the sequences
    its blocks have done (their progress files), so its card moves during a long block."""
    n = min(total, sum(1 for v in store.marker_states(stage).values() if v == "complete"))
    if BY_NAME[stage].over != "blocks":
        return 100.0 * n / total, f"{stage}: {n} of {total} shards complete"
    done = n_sequences if n == total else min(n_sequences, sum(p["done"] for p in store.read_progress(stage).values()))
    return 100.0 * done / n_sequences, f"{stage}: {n} of {total} blocks complete, {done} of {n_sequences} sequences"


def _raise_if(failed: list[str]) -> None:
    if failed:
        raise ShardsFailed(f"{len(failed)} shard(s) failed: " + "; ".join(failed[:5])
                           + ("; ..." if len(failed) > 5 else "") + ". Rerun the same command to compute only those.")


@flow(name="neuron-embeddings", log_prints=True)
def neuron_embeddings_run(
    out: str,
    model: str = default("model"),
    dataset: str = default("dataset"),
    layers: str | None = None,
    n_sequences: int = default("n_sequences"),
    ctx_len: int = default("ctx_len"),
    k: int = default("k"),
    selection: str = default("selection"),
    shard_size: int = default("shard_size"),
    linkage: str = default("linkage"),
    threshold: float = default("threshold"),
    seed: int = default("seed"),
    embedding_dtype: str = default("embedding_dtype"),
    scan_blocks: int | None = None,
    batch_size: int = default("batch_size"),
    device: str = default("device"),
    workers: int = default("workers"),
    dask_address: str | None = default("dask_address"),
    task_retries: int = default("task_retries"),
    sae: str | None = default("sae"),
    similar: bool = default("similar"),
    prepend_bos: bool | None = default("prepend_bos"),
    exclude_special_tokens: bool = default("exclude_special_tokens"),
    dtype: str | None = default("dtype"),
    strata: str | None = default("strata"),
    strata_k: int = default("strata_k"),
) -> dict:
    """Neuron embeddings, clusters and polysemanticity metrics for every MLP neuron of `model`.

    `out` may contain `{date}` (the flow run's scheduled start, YYYY-MM-DD), so that scheduled runs
    each write a new store while a retry of the same run resumes its own. The shards run on
    `workers` local processes (a local Dask cluster) or on the Dask cluster at `dask_address`.
    With `sae` (an SAE directory in SAELens's layout) the units are that SAE's features instead of
    the MLP neurons: one row, the SAE's layer (`neuron-embeddings sae evaluate`).
    `similar=False` leaves out the all-pairs search for similar clusters (the explorer then shows
    no similar-cluster links); it costs O(clusters² × d_model), more than the rest on big models.
    `prepend_bos` (None: on for causal models with a BOS token) starts each row with BOS;
    `exclude_special_tokens` keeps special tokens from being an example's max token. `dtype` is the
    model forward's (None: the store's when resuming, else float32 on CPU and bfloat16 on GPU).
    `strata` ('0.75,0.5,0.25,0': decreasing fractions of each unit's maximum) also samples
    `strata_k` examples from each interval and records each unit's activation histogram."""
    ExecSettings(batch_size=batch_size, device=device, workers=workers, dask_address=dask_address,
                 task_retries=task_retries)  # validated before the store is touched
    check_dask_address(dask_address)
    out = _expand_out(out)
    options = dict(model=model, dataset=dataset, layers=layers, n_sequences=n_sequences, ctx_len=ctx_len,
                   k=k, selection=selection, shard_size=shard_size, linkage=linkage, threshold=threshold,
                   seed=seed, embedding_dtype=embedding_dtype, scan_blocks=scan_blocks, device=device,
                   workers=workers, sae=sae, similar=similar, prepend_bos=prepend_bos,
                   exclude_special_tokens=exclude_special_tokens, dtype=dtype, strata=strata, strata_k=strata_k)
    from prefect.runtime import flow_run

    with writer_lock(out, run_name=_run_name()), _workers_report_here(workers, dask_address), \
            keeping_scan_tables(out, in_process=workers <= 1 and not dask_address):
        shards = shard_flow.with_options(task_runner=task_runner(workers, dask_address))
        # the progress cards and the summary go on this run, the one the user started (CLI,
        # deployment, retry or schedule), not on the subflow
        shards(out, options, batch_size, device, task_retries, _count_workers(workers, dask_address),
               report_to=str(flow_run.id))
        return summarise_task(out)


def _workers_report_here(workers: int, dask_address: str | None):
    """Dask workers get this run's Prefect settings; when no PREFECT_API_URL is set (the CLI's
    own temporary server), pin that server's URL in them, or each worker process would start a
    temporary server of its own (seconds of CPU each, and task runs spread over several servers)."""
    import contextlib

    from prefect.settings import PREFECT_API_URL, temporary_settings

    if (workers <= 1 and not dask_address) or PREFECT_API_URL.value():
        return contextlib.nullcontext()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    if not url.startswith("http") or "ephemeral-prefect" in url:  # an in-process app: nothing to point at
        return contextlib.nullcontext()
    return temporary_settings({PREFECT_API_URL: url})


def _count_workers(workers: int, dask_address: str | None) -> int:
    """How many workers the shards spread over (an existing Dask cluster: its current size)."""
    if not dask_address:
        return workers
    try:
        from distributed import Client

        with Client(dask_address, timeout=10) as client:
            return max(1, len(client.scheduler_info()["workers"]))
    except Exception:  # noqa: BLE001 - only sizes the batches; the runner reports a bad address
        return max(1, workers)


def _expand_out(out: str) -> str:
    if "{date}" not in out:
        return out
    from prefect.runtime import flow_run

    start = flow_run.scheduled_start_time
    return out.replace("{date}", start.strftime("%Y-%m-%d"))


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"flow run {flow_run.name} ({flow_run.id})"


@flow(name="neuron-embeddings-shards", task_runner=ThreadPoolTaskRunner(max_workers=1))
def shard_flow(out: str, options: dict, batch_size: int, device: str, task_retries: int, n_workers: int = 1,
               report_to: str | None = None) -> None:
    """The registry's stages, phase by phase, on the task runner the parent flow chose; each
    stage's progress card goes on the flow run `report_to` (default: this one)."""
    plan = BY_NAME["prepare"].task.submit(out, options).result()
    settings = Store(out).settings()
    retry = dict(retries=task_retries, retry_delay_seconds=[2, 10, 30][:max(task_retries, 1)])
    for phase in phases(settings):
        first, names = phase[0], tuple(s.name for s in phase)
        units = plan["blocks"] if first.over == "blocks" else plan["shards"]
        if first.batched:  # several shards per task, each through the phase's stages
            batches = shard_batches(units, n_workers)
            futs = shard_batch.with_options(**retry).map(unmapped(out), batches, unmapped(list(names)),
                                                          unmapped(device), unmapped(batch_size))
        else:
            futs = first.task.with_options(**retry).map(unmapped(out), units, unmapped(device), unmapped(batch_size))
        _raise_if(_follow(out, names, len(units), list(futs), report_to))
