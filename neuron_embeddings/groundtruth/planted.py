"""Planted-neuron transformers (``neuron_embeddings.core.synthetic``) run through the real pipeline.

A variant is a ``build_planted_model`` configuration plus a corpus; ``planted_examples`` builds the
model, runs every stage of the pipeline in this process (the stage registry's stages in plan order:
prepare, [maxima], scan, embed, cluster, centroids, [similar]; the same task functions the Prefect
flow calls) into a Zarr store, and reads back each planted neuron's examples: activations, neuron
embeddings (from the store), the raw MLP inputs x of the same examples (the scan's stored x, merged
exactly as the embed stage merges them), the feature of each example's token (the truth) and the
token id (the token-identity baseline).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from neuron_embeddings.core.synthetic import (
    PlantedTruth,
    build_planted_model,
    write_planted_corpus,
)
from neuron_embeddings.storage import schema
from neuron_embeddings.storage.store import Store

BATCH_SIZE = 32  # sequences per forward in the maxima and scan stages


@dataclass(frozen=True)
class PlantedVariant:
    """A planted model and corpus: ``build`` goes to ``build_planted_model``, the rest to the corpus."""

    name: str
    build: dict = field(default_factory=dict)
    n_docs: int = 1000
    doc_len: int = 16
    ctx_len: int = 16


def unequal_scales(n_features: int, low: float = 0.35, seed: int = 0) -> list[float]:
    """Feature strength factors spread geometrically over [low, 1], in a seeded order."""
    rng = np.random.default_rng(seed + 104729)
    return [float(s) for s in rng.permutation(np.geomspace(low, 1.0, n_features))]


def run_pipeline(out: str, model_dir: str, corpus: str, batch_size: int = BATCH_SIZE, after_phase=None,
                 **opts) -> None:
    """Every stage of the pipeline in plan order, in this process, without Prefect (one block): the
    registry's stages, phase by phase, each stage's plain task function over the plan's blocks or
    shards (within a phase, unit by unit: each shard goes through the phase's stages back to back).
    `after_phase(stage names)` is called after each phase."""
    from neuron_embeddings.tasks.prepare import prepare_store
    from neuron_embeddings.tasks.registry import phases
    from neuron_embeddings.tasks.resolve import resolve_run

    options = dict(model=model_dir, dataset=corpus, layers=None, selection="top", shard_size=256,
                   linkage="average", threshold=0.5, seed=0, embedding_dtype="float32", scan_blocks=1,
                   device="cpu", workers=1)
    options.update(opts)
    settings, lm = resolve_run(out, **options)
    plan = prepare_store(out, settings, lm)
    for phase in phases(settings):
        units = plan["blocks"] if phase[0].over == "blocks" else plan["shards"]
        for unit in units:
            for stage in phase:
                stage.task.fn(out, unit, "cpu", batch_size)
        if after_phase is not None:
            after_phase([stage.name for stage in phase])


def keep_merged_x(store: str, layer: int, path: Path) -> None:
    """Save ``path`` (.npz): the sequences [d_mlp, k] and float32 MLP inputs [d_mlp, k, D] of each
    neuron's examples, merged from the scan's block tables by the embed stage's own
    ``merge_blocks`` (so slot i is topk slot i). Call it after the scan, before the embed stage
    deletes those tables."""
    from neuron_embeddings.core.scan import merge_blocks

    g = Store(store).open_read_only()
    parts = {n: g[schema.SCAN[n].path][:, layer] for n in ("key", "act", "seq", "pos", "x")}
    top = merge_blocks(parts["key"], parts["act"], parts["seq"], parts["pos"], parts["x"].astype(np.float32),
                       int(g.attrs["k"]))
    np.savez(path, seq=top.seq, x=top.x)


def merged_x(g, layer: int, path: Path) -> np.ndarray:
    """[d_mlp, k, D] float32 MLP inputs of each neuron's stored examples, as ``keep_merged_x`` saved
    them to ``path``, checked against the store's top-k (``g``: its Zarr group)."""
    saved = np.load(path)
    if not np.array_equal(saved["seq"], g[schema.TOPK_SEQ.path][layer]):
        raise AssertionError(f"{path}: the merged scan tables disagree with {schema.TOPK_SEQ.path}")
    return saved["x"]


def x_path(store: str | Path) -> Path:
    """Where ``planted_examples`` keeps a store's merged MLP inputs (beside the store)."""
    return Path(str(store).removesuffix(".zarr") + ".x.npz")


def store_examples(store: str, truth: PlantedTruth, name: str, layer: int = 0):
    """The ``NeuronExamples`` of the planted neurons of ``layer`` in a finished store (with its
    merged MLP inputs at ``x_path(store)``)."""
    from neuron_embeddings.groundtruth.measures import NeuronExamples

    g = Store(store).open_read_only()
    k = int(g.attrs["k"])
    act, seq, pos = (g[spec.path][layer] for spec in (schema.TOPK_ACT, schema.TOPK_SEQ, schema.TOPK_POS))  # [M, k]
    emb = g[schema.EMBEDDINGS.path][layer].astype(np.float32)  # [M, k, D]
    x = merged_x(g, layer, x_path(store))
    tokens = g[schema.TOKENS.path][...]
    have = seq >= 0
    tok = np.where(have, tokens[np.where(have, seq, 0), np.where(have, pos, 0)], -1)  # [M, k]
    feat = np.where(have, truth.token_feature()[np.maximum(tok, 0)], -1)
    planted = np.flatnonzero(truth.n_clusters() > 0)
    return NeuronExamples(name, act[planted], emb[planted], x[planted], feat[planted], tok[planted],
                          truth.n_clusters()[planted],
                          dict(kind="planted", neurons=planted.tolist(), store=str(store),
                               stored_labels=g[schema.LABELS.path][layer][planted],
                               stored_n_clusters=g[schema.METRIC_ARRAYS["n_clusters"].path][layer][planted],
                               **({"paths": np.array(truth.neuron_paths)[planted]} if truth.neuron_paths else {})))


def planted_examples(workdir: str | Path, variant: PlantedVariant, seed: int, selection: str = "top",
                     k: int = 50):
    """Build ``variant`` with ``seed`` under ``workdir`` (reused if there), run the pipeline with
    ``selection`` and ``k``, and return the planted neurons' ``NeuronExamples``."""
    root = Path(workdir) / f"{variant.name}-s{seed}"
    model_dir, corpus = root / "model", root / "corpus.txt"
    if (model_dir / "planted.json").exists():
        truth = PlantedTruth.from_json(model_dir)
    else:
        truth = build_planted_model(model_dir, seed=seed, **variant.build)
        write_planted_corpus(corpus, truth, n_docs=variant.n_docs, doc_len=variant.doc_len, seed=seed)
    store = root / f"store-{selection.replace(':', '')}-k{k}.zarr"
    n_tokens = variant.n_docs * (variant.doc_len + 1)
    def keep_x(stages: list[str]) -> None:
        if "scan" in stages and not x_path(store).exists():
            keep_merged_x(str(store), 0, x_path(store))

    run_pipeline(str(store), str(model_dir), str(corpus), n_sequences=n_tokens // variant.ctx_len,
                 ctx_len=variant.ctx_len, k=k, selection=selection, seed=seed, after_phase=keep_x)
    ex = store_examples(str(store), truth, f"{variant.name}")
    ex.info.update(variant=asdict(variant), seed=seed, selection=selection)
    return ex
