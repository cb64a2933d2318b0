"""Each piece has one home: array paths are written only in storage/schema.py, the stage list only
in tasks/registry.py (the package's code; tests and docs may name them)."""
from __future__ import annotations

import ast

from neuron_embeddings.storage import schema
from neuron_embeddings.tasks.registry import STAGES
from tests.test_layers import modules

PATHS = {a.path for a in schema.ARRAYS if "/" in a.path}
GROUPS = {p.split("/")[0] + "/" for p in PATHS}
STAGE_NAMES = {s.name for s in STAGES}


def path_literals(source: str) -> list[str]:
    """String constants (and f-string heads) that name a grouped array path, e.g. "topk/seq" or f"metrics/{m}"."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in PATHS:
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value) in GROUPS:
            out.append(str(node.values[0].value) + "{...}")
    return out


def stage_lists(source: str) -> list[list[str]]:
    """Literal tuples / lists of two or more stage names (a stage order written by hand)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and e.value in STAGE_NAMES for e in node.elts):
            out.append([e.value for e in node.elts])
    return out


def test_array_paths_live_in_the_schema_module():
    found = {m: path_literals(p.read_text()) for m, p in modules().items() if m != "neuron_embeddings.storage.schema"}
    assert {m: v for m, v in found.items() if v} == {}
    assert path_literals(modules()["neuron_embeddings.storage.schema"].read_text())  # the check sees them there


def test_the_stage_list_lives_in_the_registry():
    found = {m: stage_lists(p.read_text()) for m, p in modules().items() if m != "neuron_embeddings.tasks.registry"}
    assert {m: v for m, v in found.items() if v} == {}
    assert path_literals('x = f"metrics/{m}"\ny = "topk/seq"') == ["metrics/{...}", "topk/seq"]
    assert stage_lists('S = ("embed", "cluster", "centroids")') == [["embed", "cluster", "centroids"]]


def test_registry_declares_each_stage_once_in_its_own_module():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    homes = [s.task.fn.__module__ for s in STAGES]
    assert len(homes) == len(set(homes)), homes  # one module per stage
    for s in STAGES:
        assert set(s.needs) <= set(names[:names.index(s.name)]), s.name  # needs come earlier in plan order
        assert s.barrier or s.batched, s.name  # the flow runs a phase of several stages only in shard batches
