"""What every stage task shares: markers as the source of truth, logging, the test-only fault switch.

`run_unit` skips a unit whose marker says complete, runs it, and writes the marker only after the
unit's data is written; an exception leaves a `.failed` marker with the message and is re-raised
(so Prefect retries or fails the run), and never a `.done` one.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from neuron_embeddings.core.resources import release_openmp_threads
from neuron_embeddings.storage.store import Store


class InjectedFault(RuntimeError):
    """Raised by the test-only fault switch (`NE_TEST_FAULT`)."""


FAULT_ENV, FAULT_DIR_ENV = "NE_TEST_FAULT", "NE_TEST_FAULT_DIR"


UNIT_LOGGER = "neuron_embeddings.units"  # task_logger outside a run (e.g. the CLI's in-process prepare)


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task or flow run, the module logger outside one."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:
        pass
    return logging.getLogger(UNIT_LOGGER)


def maybe_fault(stage: str, unit: str) -> None:
    """The test-only fault switch, read from the environment (never a flow or deployment
    parameter): `NE_TEST_FAULT=SHARD` or `STAGE/SHARD` fails every attempt of that unit; with the
    suffix `:once` only the first attempt fails (a transient fault), remembered by a flag file in
    the directory `NE_TEST_FAULT_DIR` that the test provides (nothing is written into the store)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, mode = spec.partition(":")
    if target not in (unit, f"{stage}/{unit}"):
        return
    if mode == "once":
        flags = os.environ.get(FAULT_DIR_ENV)
        if not flags:
            raise RuntimeError(f"{FAULT_ENV}={spec} needs {FAULT_DIR_ENV}, a directory for its flag")
        flag = os.path.join(flags, f"{stage}-{unit}")
        if os.path.exists(flag):
            return
        open(flag, "w").close()
    raise InjectedFault(f"fault injected into {stage} shard {unit}")


def run_unit(store_url: str, stage: str, unit: str, work: Callable[[Store], dict]) -> dict:
    """Run one unit of a stage unless its marker says complete; return a small record."""
    store = Store(store_url)
    log = task_logger()
    if store.is_complete(stage, unit):
        log.info("%s %s: already complete, skipped", stage, unit)
        return {"stage": stage, "unit": unit, "skipped": True}
    t0 = time.perf_counter()
    try:
        maybe_fault(stage, unit)
        record = work(store)
    except BaseException as e:
        try:
            store.mark_failed(stage, unit, f"{type(e).__name__}: {e}")
        except OSError as marker_error:  # e.g. the disk is full: report the unit's own error
            log.error("%s %s: could not write its failure marker (%s)", stage, unit, marker_error)
        log.error("%s %s failed: %s: %s", stage, unit, type(e).__name__, e)
        raise
    finally:
        release_openmp_threads()  # this thread's torch threads: only the scan's forward should keep a pool
    record = {"stage": stage, "unit": unit, "skipped": False,
              "seconds": round(time.perf_counter() - t0, 3), "worker": f"{socket.gethostname()}:{os.getpid()}", **record}
    store.mark_complete(stage, unit, record)
    log.info("%s %s: done in %.2f s %s", stage, unit, record["seconds"],
             {k: v for k, v in record.items() if k not in ("stage", "unit", "skipped", "seconds", "worker")})
    return record


_HANDOFF: dict[tuple[str, str], dict] = {}
_HANDOFF_LOCK = threading.Lock()


_HANDOFF_KEEP = 4  # shards kept (tasks.shards has at most 2 in flight)


def hand_over(out: str, shard_id: str, **arrays) -> None:
    """Keep a shard's just-written arrays in memory for the next stage of the same shard in this
    process (tasks.shards runs them back to back), so it need not read them back from the store.
    Only the latest few shards are kept; the arrays must equal what was written."""
    with _HANDOFF_LOCK:
        kept = _HANDOFF.pop((out, shard_id), {})
        _HANDOFF[(out, shard_id)] = {**kept, **arrays}  # now the most recent
        while len(_HANDOFF) > _HANDOFF_KEEP:
            del _HANDOFF[next(iter(_HANDOFF))]


def handed_over(out: str, shard_id: str, name: str):
    """An array `hand_over` kept for this shard, or None (then read it from the store)."""
    with _HANDOFF_LOCK:
        return _HANDOFF.get((out, shard_id), {}).get(name)


def progress_artifact(key: str, description: str):
    """A Prefect progress artifact inside a task run (a callable taking a percentage and optionally
    a new description), else None."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return None
        artifact = create_progress_artifact(0.0, key=key, description=description)
    except (ImportError, RuntimeError):
        return None
    return lambda percent, text=None: update_progress_artifact(artifact, float(percent), description=text)
