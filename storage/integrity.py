"""Is a store's data what its markers say was written?

Each `.done` marker records the chunks its unit wrote (`chunks`: key -> [bytes, crc32c], keys
relative to the store) and when (`completed`). A chunk is damaged when it is missing, has another
size, or (with checksums) another CRC-32C than its last writer recorded. Chunks are aligned to
units, so one unit writes each chunk; should a chunk ever be written by several units, the record
completed last holds its expected bytes and every unit that wrote it counts as damaged.

Array metadata (`<array>/zarr.json`) must exist and describe the array the schema plans; a
missing or unreadable one is recreated from the schema (`store.schema_metadata`) when the chunks
then decode, else reported.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import zarr

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.storage import schema
from neuron_embeddings.storage.store import Store, array_specs, crc32c, dim_sizes, schema_metadata

Unit = tuple[str, str]  # (stage, unit id)
# an intermediate whose chunks the similar stage deletes once it is complete, and whose shards
# recompute from the embeddings where they are missing: a missing chunk is not damage
RELEASED_WHEN_DONE = f"{schema.CENTROIDS.path}/"


@dataclass
class Verification:
    """What `verify` found: damaged units (first problem each), arrays with bad metadata, and counts."""
    damaged: dict[Unit, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # array path -> problem
    units: int = 0  # complete units checked
    chunks: int = 0  # chunks checked
    unrecorded: int = 0  # complete units whose marker lists no chunks (written by an older version)
    checksums: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.metadata


def complete_records(store: Store, stages: list[str] | None = None) -> tuple[dict[Unit, dict], dict[Unit, str]]:
    """(record of every complete unit, units whose marker cannot be read -> problem)."""
    records, bad = {}, {}
    for stage in stages if stages is not None else store.marker_stages():
        for unit, state in store.marker_states(stage).items():
            if state != "complete":
                continue
            try:
                rec = json.loads(store.marker_record(stage, unit))
                records[(stage, unit)] = rec if isinstance(rec, dict) else {}
            except (OSError, ValueError):
                bad[(stage, unit)] = "its marker is unreadable"
    released = {key for (stage, _), rec in records.items() if stage == "embed" for key in rec.get("releases", ())}
    if released:  # scratch deleted on purpose once its shard was embedded (listed in its marker): not damage
        for rec in records.values():
            if rec.get("chunks"):
                rec["chunks"] = {k: v for k, v in rec["chunks"].items() if k not in released}
    return records, bad


def _sizes(store: Store, keys: list[str]) -> dict[str, int]:
    """Size of each existing key (one listing of the store for many keys, one stat each for few)."""
    if len(keys) > 64:
        found = store.fs.find(store.root, detail=True)
        prefix = len(store.root) + 1
        return {p[prefix:]: int(info["size"]) for p, info in found.items()}
    out = {}
    for k in keys:
        try:
            out[k] = int(store.fs.info(f"{store.root}/{k}")["size"])
        except (FileNotFoundError, OSError):
            pass
    return out


def check_records(store: Store, records: dict[Unit, dict], checksums: bool = False) -> tuple[dict[Unit, str], int]:
    """(damaged units -> their first problem, chunks checked) for the given units' records."""
    last: dict[str, tuple[float, int, int]] = {}  # key -> (completed, bytes, crc) of its last writer
    writers: dict[str, list[Unit]] = defaultdict(list)
    for unit, rec in records.items():
        for key, (size, crc) in (rec.get("chunks") or {}).items():
            writers[key].append(unit)
            t = float(rec.get("completed", 0))
            if key not in last or t >= last[key][0]:
                last[key] = (t, int(size), int(crc))
    sizes = _sizes(store, list(last))
    damaged: dict[Unit, str] = {}
    for key in sorted(last):
        _, size, crc = last[key]
        got = sizes.get(key)
        if got is None:
            if key.startswith(RELEASED_WHEN_DONE):  # deleted once the similar stage is complete; recomputed if needed
                continue
            problem = f"chunk {key} is missing"
        elif got != size:
            problem = f"chunk {key} has {got} bytes, {size} were written"
        elif checksums and crc32c(store.fs.cat_file(f"{store.root}/{key}")) != crc:
            problem = f"chunk {key} does not match its checksum"
        else:
            continue
        for unit in writers[key]:
            damaged.setdefault(unit, problem)
    return damaged, len(last)


def damaged_units(store: Store, checksums: bool = False, stages: list[str] | None = None) -> dict[Unit, str]:
    """Every complete unit whose recorded chunks are missing, resized (or, with `checksums`,
    changed), or whose marker is unreadable -> what is wrong."""
    records, bad = complete_records(store, stages)
    damaged, _ = check_records(store, records, checksums)
    return {**bad, **damaged}


def check_metadata(store: Store) -> dict[str, str]:
    """Arrays of the schema whose `zarr.json` is missing, unreadable or of another shape -> problem."""
    attrs = store.attrs
    try:
        sizes = dim_sizes(attrs)
    except KeyError:  # a store without the sizes in its attributes: nothing to check against
        return {}
    out = {}
    for spec in array_specs(attrs):
        path = f"{store.root}/{spec.path}/zarr.json"
        try:
            meta = json.loads(store.fs.cat_file(path))
        except FileNotFoundError:
            if not spec.optional:  # an optional array (a coordinate) is absent from older stores
                out[spec.path] = "its zarr.json is missing"
            continue
        except (OSError, ValueError):
            out[spec.path] = "its zarr.json is unreadable"
            continue
        if not isinstance(meta, dict) or meta.get("node_type") != "array" or \
                tuple(meta.get("shape", ())) != schema.shape(spec, sizes):
            out[spec.path] = "its zarr.json does not describe the array the schema plans"
    return out


def repair_metadata(store: Store) -> list[str]:
    """Recreate every missing or unreadable array `zarr.json` from the schema; return what was
    recreated. Raises UserError (one line) for one that cannot be: its chunks do not decode with it."""
    problems = check_metadata(store)
    if not problems:
        return []
    attrs = store.attrs
    done = []
    for path, problem in problems.items():
        spec = schema.BY_PATH[path]
        target = f"{store.root}/{path}/zarr.json"
        old = store.fs.cat_file(target) if store.fs.exists(target) else None
        store._write_atomic(target, schema_metadata(attrs, spec))
        try:  # the first chunk must decode with the recreated metadata
            a = zarr.open_array(store._zarr_target(), path=path, mode="r")
            a[(0,) * a.ndim]
        except Exception as e:  # noqa: BLE001 - any failure to read means the metadata is not right
            if old is not None:
                store._write_atomic(target, old)
            else:
                store.fs.rm(target)
            raise UserError(f"{store.url}: array {path}: {problem[4:]} and cannot be recreated from the schema "
                            f"({type(e).__name__}); rerun with a new --out") from e
        done.append(f"{path}: {problem[4:]}; recreated from the schema")
    return done


def verify(store: Store, checksums: bool = True) -> Verification:
    """Check every complete unit's chunks (existence, size and, with `checksums`, CRC-32C) and
    every array's metadata, reading nothing but the chunk files and the markers."""
    v = Verification(checksums=checksums)
    v.metadata = check_metadata(store)
    records, bad = complete_records(store)
    v.units = len(records) + len(bad)
    v.unrecorded = sum(1 for r in records.values() if "chunks" not in r)
    damaged, v.chunks = check_records(store, records, checksums)
    v.damaged = {**bad, **damaged}
    return v


def format_verification(v: Verification) -> list[str]:
    """One line per damaged array or unit, then a summary line."""
    lines = [f"damaged  array {p}: {msg}" for p, msg in sorted(v.metadata.items())]
    lines += [f"damaged  {stage}/{unit}: {msg}" for (stage, unit), msg in sorted(v.damaged.items())]
    how = "existence, size and checksum" if v.checksums else "existence and size"
    summary = (f"verified {v.units} complete shards, {v.chunks} chunks ({how}): "
               f"{len(v.damaged)} damaged shards, {len(v.metadata)} damaged arrays")
    if v.unrecorded:
        summary += f"; {v.unrecorded} shards without a chunk record (older version) not checked"
    if not v.ok:
        summary += "; rerun the same command to recompute them"
    return lines + [summary]
