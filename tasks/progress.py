"""Progress of a scan block: a file in the store for the CLI's bars and a Prefect progress artifact for the UI."""
from __future__ import annotations

import time

from neuron_embeddings.tasks.common import progress_artifact


def progress_writer(store, stage: str, unit: str, total: int, every_s: float = 1.0, artifact_every_s: float = 5.0):
    """A callback (sequences done, seconds) that records the block's progress: a file in the store
    (for the CLI's bars, at most every `every_s` seconds) and a Prefect progress artifact (for the
    UI; an API call, at most every `artifact_every_s` seconds), both at the end."""
    state = {"done": 0, "last": 0.0, "last_artifact": time.monotonic()}
    artifact = progress_artifact(f"{stage}-{unit.lower()}", f"{stage} block {unit}: sequences done of {total}")

    def report(n: int, _seconds: float) -> None:
        state["done"] += n
        now, end = time.monotonic(), state["done"] >= total
        if now - state["last"] >= every_s or end:
            state["last"] = now
            store.write_progress(stage, unit, state["done"], total)
        if artifact is not None and (now - state["last_artifact"] >= artifact_every_s or end):
            state["last_artifact"] = now
            artifact(100.0 * state["done"] / total)
    store.write_progress(stage, unit, 0, total)
    return report
