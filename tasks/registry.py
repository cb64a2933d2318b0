"""The stage registry: every stage of a run declared once, in plan order.

A stage has a name, the stages it needs, what it iterates over (`once`, scan `blocks`, neuron
`shards`), its task (module-level `@task`; `.fn` is the plain function) and when it runs. The flow,
the shard batches, the workers' preload, the CLI's progress bars, `status`, the tests' helpers and
the ground-truth benchmark all read this list: a new stage is one module plus one entry here.

`barrier`: the stage needs every unit of the stages before it (the scan needs every block's maxima,
embed every block's scan, similar every shard's centroids); stages without a barrier run shard by
shard right after the one before, in the same shard batch. `batched`: its shards run in batches of
several shards per Prefect task (tasks.shards), else one task per unit.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from neuron_embeddings.core.plan import neuron_shards, scan_blocks
from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.storage import integrity
from neuron_embeddings.storage.status import StoreStatus, store_status
from neuron_embeddings.storage.store import Store
from neuron_embeddings.tasks.centroids import centroid_shard
from neuron_embeddings.tasks.cluster import cluster_store_shard
from neuron_embeddings.tasks.embed import embed_shard
from neuron_embeddings.tasks.logits import logits_shard
from neuron_embeddings.tasks.maxima import maxima_block
from neuron_embeddings.tasks.prepare import prepare_task
from neuron_embeddings.tasks.scan import scan_block
from neuron_embeddings.tasks.similar import similar_shard


def _always(settings: RunSettings) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    over: str  # "once" | "blocks" | "shards"
    task: object  # a prefect Task: task.fn(out, unit, device, batch_size) -> small record
    barrier: bool = True
    when: Callable[[RunSettings], bool] = _always
    batched: bool = False  # shards run in batches, several shards per Prefect task (tasks.shards)
    unit: str = "shard"  # what the CLI's progress bar counts: "seq" (sequences) or "shard"

    def runs(self, settings: RunSettings) -> bool:
        return self.when(settings)


STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), "once", prepare_task),
    Stage("maxima", ("prepare",), "blocks", maxima_block, when=lambda s: s.needs_maxima, unit="seq"),
    Stage("scan", ("prepare", "maxima"), "blocks", scan_block, unit="seq"),
    Stage("embed", ("scan",), "shards", embed_shard, batched=True),
    Stage("cluster", ("embed",), "shards", cluster_store_shard, barrier=False, batched=True),
    Stage("centroids", ("cluster",), "shards", centroid_shard, barrier=False, batched=True),
    Stage("logits", ("prepare",), "shards", logits_shard, barrier=False, batched=True),
    Stage("similar", ("centroids",), "shards", similar_shard, when=lambda s: s.similar, batched=True),
)
BY_NAME = {s.name: s for s in STAGES}
# modules a worker process imports as it starts (the shard stages' SciPy, torch, ... imports)
PRELOAD = tuple(sorted({s.task.fn.__module__ for s in STAGES if s.over == "shards"}))


def stage_units(stage: str | Stage, settings: RunSettings, d_mlp: int) -> list[str]:
    """Ids of the work units of a stage, in plan order (none when the stage does not run)."""
    stage = BY_NAME[stage] if isinstance(stage, str) else stage
    if not stage.runs(settings):
        return []
    if stage.over == "once":
        return ["all"]
    if stage.over == "blocks":
        return [b.id for b in scan_blocks(settings)]
    return [s.id for s in neuron_shards(settings, d_mlp)]


def plan_units(settings: RunSettings, d_mlp: int) -> dict[str, list[str]]:
    """stage -> its unit ids, for every stage (what `status` and the progress bars count)."""
    return {s.name: stage_units(s, settings, d_mlp) for s in STAGES}


def phases(settings: RunSettings) -> list[list[Stage]]:
    """The stages after `prepare` that run, grouped into phases: a phase starts at each barrier,
    and its stages run unit by unit back to back (one stage per phase for blocks)."""
    out: list[list[Stage]] = []
    for stage in STAGES:
        assert stage.barrier or stage.batched, f"{stage.name}: a stage without a barrier runs in shard batches"
        if stage.over == "once" or not stage.runs(settings):
            continue
        if stage.barrier or not out:
            out.append([stage])
        else:
            out[-1].append(stage)
    return out


def dependents(units: set[tuple[str, str]], settings: RunSettings, d_mlp: int) -> set[tuple[str, str]]:
    """The given (stage, unit)s and every unit that depends on them, through the stages' `needs`:
    a stage without a barrier over the same units needs the same unit; any other needs them all."""
    plan = plan_units(settings, d_mlp)
    out, todo = set(units), list(units)
    while todo:
        stage, unit = todo.pop()
        for s in STAGES:
            if stage not in s.needs:
                continue
            same = not s.barrier and s.over == BY_NAME[stage].over
            for u in ([unit] if same else plan[s.name]):
                if (s.name, u) not in out:
                    out.add((s.name, u))
                    todo.append((s.name, u))
    return out


def repair_store(url: str, log=None) -> list[str]:
    """Before a resume: recreate missing array metadata from the schema, find the complete units
    whose recorded chunks are missing or of another size (storage.integrity), and clear their
    markers and those of every unit that depends on them, so the run recomputes them. Returns
    one line per finding."""
    store = Store(url)
    if not store.exists():
        return []
    lines = integrity.repair_metadata(store)
    damaged = integrity.damaged_units(store)
    settings, d_mlp = store.settings(), int(store.attrs["d_mlp"])
    lines += _rescan_lost_tables(store, settings, d_mlp)
    if damaged:
        stale = dependents(set(damaged), settings, d_mlp)
        lines += [f"{stage}/{unit}: {msg}" for (stage, unit), msg in sorted(damaged.items())]
        lines.append(f"recomputing {len(damaged)} damaged unit(s) and the {len(stale) - len(damaged)} that depend on them")
        records, _ = integrity.complete_records(store, ["embed"])
        if any(records.get(unit, {}).get("releases") for unit in stale):
            stale |= {("scan", b) for b in stage_units("scan", settings, d_mlp)}  # their input was deleted
            lines.append("the scan's partial tables they need were deleted after use: rescanning")
        for stage, unit in sorted(stale):
            store.clear_marker(stage, unit)
    for line in lines:
        (log or logging.getLogger("neuron_embeddings")).warning("store %s: %s", url, line)
    return lines


def _rescan_lost_tables(store: Store, settings: RunSettings, d_mlp: int) -> list[str]:
    """Clear the marker of a scan block whose tables were kept in the memory of a run that ended
    before every shard was embedded (tasks.kept: a kill), so this run scans it again."""
    records, _ = integrity.complete_records(store, ["scan"])
    lost = [unit for (_, unit), rec in records.items() if rec.get("tables") == "memory"]
    if not lost:
        return []
    embedded = {u for u, state in store.marker_states("embed").items() if state == "complete"}
    if set(stage_units("embed", settings, d_mlp)) <= embedded:
        return []
    for unit in lost:
        store.clear_marker("scan", unit)
    return [f"scan block {unit}: its tables were kept in the memory of a run that stopped before every shard was "
            "embedded: rescanning" for unit in lost]


def run_status(url: str) -> StoreStatus:
    """Every stage's units in the store at `url`, with the state their markers give."""
    return store_status(url, plan_units)
