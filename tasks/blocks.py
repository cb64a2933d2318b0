"""What the block stages (maxima, scan) share: a block's inputs, and its progress (a file in the
store for the CLI's bars, a Prefect progress artifact for the UI)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from neuron_embeddings.core.models import LoadedModel, load_model
from neuron_embeddings.core.plan import block_id
from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.core.units import UnitSource, unit_source
from neuron_embeddings.storage import store as st
from neuron_embeddings.tasks.common import progress_artifact


@dataclass
class BlockInputs:
    settings: RunSettings
    lm: LoadedModel
    units: UnitSource
    tokens_ST: np.ndarray  # the block's sequences
    report: object  # progress callback (sequences done, seconds)


def block_inputs(store: st.Store, block: dict, stage: str, device: str) -> BlockInputs:
    """The store's settings, the model (loaded once per process), its unit source, the block's
    tokens and a progress writer for `stage`."""
    s = store.settings()
    lm = load_model(s.model, device, s.dtype)
    tokens = st.read_tokens(store, block["start"], block["stop"])
    report = progress_writer(store, stage, block_id(block["index"]), len(tokens))
    return BlockInputs(s, lm, unit_source(lm, s.model, s.sae), tokens, report)


def progress_writer(store, stage: str, unit: str, total: int, every_s: float = 1.0, artifact_every_s: float = 5.0):
    """A callback (sequences done, seconds) that records the block's progress: a file in the store
    (for the CLI's bars, at most every `every_s` seconds) and a Prefect progress artifact (for the
    UI; an API call, at most every `artifact_every_s` seconds), both at the end."""
    state = {"done": 0, "last": 0.0, "last_artifact": time.monotonic()}
    artifact = progress_artifact(f"{stage}-{unit.lower()}", f"{stage} block {unit}: 0 of {total} sequences done")

    def report(n: int, _seconds: float) -> None:
        state["done"] += n
        now, end = time.monotonic(), state["done"] >= total
        if now - state["last"] >= every_s or end:
            state["last"] = now
            store.write_progress(stage, unit, state["done"], total)
        if artifact is not None and (now - state["last_artifact"] >= artifact_every_s or end):
            state["last_artifact"] = now
            artifact(100.0 * state["done"] / total, f"{stage} block {unit}: {state['done']} of {total} sequences done")
    store.write_progress(stage, unit, 0, total)
    return report
