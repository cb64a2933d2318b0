"""What is complete, failed and pending in a store, read from its shard markers."""
from __future__ import annotations

from dataclasses import dataclass, field

from collections.abc import Callable

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.storage.store import Store


@dataclass
class StoreStatus:
    url: str
    units: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> unit -> state
    messages: dict[tuple[str, str], str] = field(default_factory=dict)  # (stage, unit) -> failure

    def count(self, state: str, stage: str | None = None) -> int:
        stages = [stage] if stage else list(self.units)
        return sum(1 for s in stages for v in self.units[s].values() if v == state)

    @property
    def complete(self) -> int:
        return self.count("complete")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def pending(self) -> int:
        return self.count("pending")


def store_status(url: str, plan: Callable[[RunSettings, int], dict[str, list[str]]]) -> StoreStatus:
    """Each stage's units (from `plan(settings, d_mlp)`: stage -> unit ids, e.g. the stage
    registry's `plan_units`) with the state their markers give."""
    store = Store(url)
    if not store.exists():
        raise UserError(f"{url}: no store here; create one with `neuron-embeddings run ... --out {url}`")
    settings, d_mlp = store.settings(), int(store.attrs["d_mlp"])
    status = StoreStatus(url)
    for stage, units in plan(settings, d_mlp).items():
        marks = store.marker_states(stage)
        status.units[stage] = {u: marks.get(u, "pending") for u in units}
        for u in units:
            if marks.get(u) == "failed":
                status.messages[(stage, u)] = store.failure_message(stage, u)
    return status


def format_status(status: StoreStatus, max_listed: int = 10) -> str:
    lines = [f"store {status.url}"]
    for stage, units in status.units.items():
        if not units:
            continue
        c, f, p = (status.count(s, stage) for s in ("complete", "failed", "pending"))
        lines.append(f"{stage:8s} {len(units):5d} shards: {c} complete, {f} failed, {p} pending")
        for state in ("failed", "pending"):
            names = [u for u, v in units.items() if v == state]
            for u in names[:max_listed]:
                msg = status.messages.get((stage, u), "")
                lines.append(f"  {state:7s} {stage}/{u}" + (f": {msg}" if msg else ""))
            if len(names) > max_listed:
                lines.append(f"  ... and {len(names) - max_listed} more {state}")
    lines.append(f"{status.complete} complete, {status.failed} failed, {status.pending} pending")
    return "\n".join(lines)
