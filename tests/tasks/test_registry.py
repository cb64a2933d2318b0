"""The stage registry: which stages run, in which phases, over which units."""
from __future__ import annotations

from neuron_embeddings.core.settings import RunSettings
from neuron_embeddings.tasks.registry import PRELOAD, STAGES, phases, plan_units, stage_units


def _settings(**over) -> RunSettings:
    return RunSettings(**{"model": "m", "dataset": "d", "layers": (0, 3), "n_sequences": 10, "k": 4, "shard_size": 100,
                          "scan_blocks": 2, **over})


def _names(s: RunSettings) -> list[list[str]]:
    return [[stage.name for stage in phase] for phase in phases(s)]


def test_phases_follow_the_settings():
    assert _names(_settings()) == [["scan"], ["embed", "cluster", "centroids", "logits"], ["similar"]]
    assert _names(_settings(selection="band:0.5")) == [["maxima"], ["scan"],
                                                       ["embed", "cluster", "centroids", "logits"], ["similar"]]
    assert _names(_settings(similar=False)) == [["scan"], ["embed", "cluster", "centroids", "logits"]]


def test_units_per_stage():
    units = plan_units(_settings(), d_mlp=250)  # 2 rows x 3 shards of up to 100 neurons; 2 scan blocks
    assert units["prepare"] == ["all"] and units["maxima"] == [] and units["scan"] == ["B0000", "B0001"]
    assert units["embed"] == ["L00-N00000", "L00-N00100", "L00-N00200", "L03-N00000", "L03-N00100", "L03-N00200"]
    assert units["similar"] == units["embed"] == units["logits"] and stage_units("similar", _settings(similar=False), 250) == []
    assert set(units) == {s.name for s in STAGES}


def test_workers_preload_the_shard_stages():
    assert set(PRELOAD) == {s.task.fn.__module__ for s in STAGES if s.over == "shards"}
    assert "neuron_embeddings.tasks.embed" in PRELOAD and "neuron_embeddings.tasks.scan" not in PRELOAD
