"""The work units of a run: neuron shards (one store row x a range of units) and scan blocks
(a range of sequences). Pure: which units exist follows from the settings and the unit count."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuron_embeddings.core.settings import RunSettings


@dataclass(frozen=True)
class NeuronShard:
    row: int  # row in the store (index into settings.layers)
    layer: int  # the model's layer index
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"L{self.layer:02d}-N{self.start:05d}"


@dataclass(frozen=True)
class ScanBlock:
    index: int
    start: int  # first sequence
    stop: int

    @property
    def id(self) -> str:
        return f"B{self.index:04d}"


def neuron_shards(settings: RunSettings, d_mlp: int) -> list[NeuronShard]:
    return [NeuronShard(row, layer, s, min(s + settings.shard_size, d_mlp))
            for row, layer in enumerate(settings.layers)
            for s in range(0, d_mlp, settings.shard_size)]


def scan_blocks(settings: RunSettings) -> list[ScanBlock]:
    edges = np.linspace(0, settings.n_sequences, settings.scan_blocks + 1).round().astype(int)
    return [ScanBlock(i, int(a), int(b)) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]


def block_id(index: int) -> str:
    return ScanBlock(index, 0, 0).id
