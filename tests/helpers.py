"""Test helpers: run the pipeline's stages in-process (no Prefect), read stores, check the contract."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import zarr

from neuron_embeddings.core.settings import default
from neuron_embeddings.storage.schema import CONTRACT
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.prepare import prepare_store
from neuron_embeddings.tasks.registry import phases
from neuron_embeddings.tasks.resolve import resolve_run

CONTRACT_ARRAYS = list(CONTRACT)


def options(model: str, **over) -> dict:
    """Small run options for tests (the rest: the settings' defaults)."""
    base = dict(model=model, dataset=default("dataset"), layers=None, n_sequences=24, ctx_len=32, k=6,
                selection=default("selection"), shard_size=64, linkage=default("linkage"),
                threshold=default("threshold"), seed=default("seed"), embedding_dtype="float32", scan_blocks=1,
                device="cpu", workers=1, prepend_bos=default("prepend_bos"),
                exclude_special_tokens=default("exclude_special_tokens"))
    base.update(over)
    return base


def run_stages(out: str, batch_size: int = 8, stages: tuple[str, ...] | None = None, **opts) -> zarr.Group:
    """Every stage of the registry in plan order (only `stages` after `prepare`, when given: a
    half-done store), by calling the task functions directly (no Prefect)."""
    settings, lm = resolve_run(out, **opts)
    plan = prepare_store(out, settings, lm)
    for phase in phases(Store(out).settings()):
        units = plan["blocks"] if phase[0].over == "blocks" else plan["shards"]
        for unit in units:
            for stage in phase:
                if stages is None or stage.name in stages:
                    stage.task.fn(out, unit, "cpu", batch_size)
    return zarr.open_group(out, mode="r")


def contract_arrays(out: str, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """The contract's arrays of a store (plus `extra` ones), read whole."""
    g = zarr.open_group(out, mode="r")
    return {name: g[name][...] for name in [*CONTRACT_ARRAYS, *extra]}


def assert_same_arrays(a: dict, b: dict) -> None:
    for name in a:
        if a[name].dtype.kind in "fc":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # NaN == NaN here
        else:
            assert np.array_equal(a[name], b[name]), name


def state_dir(out) -> Path:
    """The store's state directory (markers, progress, the explorer's caches): a hidden sibling."""
    return Path(Store(str(out)).state)


def marker_root(out) -> Path:
    """Where the store's markers are: `<stage>/<unit>.done` (or `.failed`) under it."""
    return state_dir(out) / "markers"


def copy_store(src, dst) -> None:
    """Copy a store with its state directory."""
    shutil.copytree(src, dst)
    if state_dir(src).exists():
        shutil.copytree(state_dir(src), state_dir(dst))


def tree_digest(path: str) -> dict[str, str]:
    """Content hash of every file under a directory (to show nothing changed)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def at_examples(values_STM: np.ndarray, seq_MK: np.ndarray, pos_MK: np.ndarray) -> np.ndarray:
    """A [S, T, M] array of per-token unit values read at each stored example: [M, k] (NaN where none)."""
    M, k = seq_MK.shape
    out = np.full((M, k), np.nan)
    have = seq_MK >= 0
    j = np.broadcast_to(np.arange(M)[:, None], (M, k))
    out[have] = values_STM[seq_MK[have], pos_MK[have], j[have]]
    return out
