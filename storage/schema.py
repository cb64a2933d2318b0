"""The store's schema: every array declared once (path, dtype, dimensions, fill, compression,
chunking). `storage.store` creates, reads and writes arrays from these declarations; no other
module names an array path.

Dimensions come from one vocabulary (`DIMS`); their sizes from the run (`sizes`). Every array
records its dimensions' names (Zarr v3 `dimension_names`), so xarray opens the store. Chunks are
aligned to the work units: one store row (`layer`) x one neuron shard (`neuron`) x the rest whole,
and one scan block (`block`), so a task writes whole chunks and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = "neuron-embeddings/2"
READABLE_VERSIONS = ("neuron-embeddings/1", SCHEMA_VERSION)  # version 1: no d_embed, gated or BOS attributes
N_SIMILAR = 5  # nearest clusters of other neurons stored per cluster (similar/*)
N_LOGITS = 10  # tokens stored per unit and direction in logits/* (most promoted, most suppressed)
WINDOW = (24, 8)  # activation window recorded around each example's max token: tokens before, after

# the dimension vocabulary: name -> what it counts
DIMS = {
    "sequence": "packed rows of the dataset", "position": "token position in a row",
    "token": "vocabulary entry", "layer": "store row (the coordinate array `layer` and the root attribute `layers` give the model's layer)",
    "neuron": "unit of the row (MLP neuron or SAE feature)", "example": "selected example, best first",
    "cluster": "cluster of a neuron (0 = largest; slots past n_clusters are empty)",
    "link": "merge step of the hierarchy", "link_field": "SciPy linkage column",
    "d_model": "component of x, the vector the units' input weights multiply",
    "d_embed": "embedding component (d_model, or 2 x d_model for gated MLPs: x*W_gate then x*W_in)",
    "offset": "token position relative to the example's max token (coordinate array `offset`)",
    "block": "data-parallel scan block", "neighbour": "similar cluster, nearest first",
    "stratum_example": "example sampled from an activation stratum (stratum by stratum, strata_k each)",
    "spectrum_example": "example of the clustering across the spectrum: the top-k, then the strata examples",
    "spectrum_cluster": "cluster of that clustering (0 = largest)",
    "source": "where examples come from: 0 = the top-k, 1 + i = stratum i", "bin": "activation histogram bin",
    "neighbour_field": "(row, neuron, cluster) of a neighbour",
    # the SAE activation cache (storage.activations)
    "row": "cached token (sequence x position, flattened)", "d_in": "component of the hook's activation",
    # logit effects (tasks/logits.py)
    "d_resid": "component of the model's residual stream (its d_model; not `d_model` in SAE stores whose hook "
               "is not the residual stream)",
    "logit_rank": "token rank of a unit's logit effect, strongest first",
}


@dataclass(frozen=True)
class ArraySpec:
    path: str
    dtype: str  # a NumPy dtype name, "embedding" (the run's embedding dtype) or "str"
    dims: tuple[str, ...]
    fill: object = None
    compress: bool | str = True  # True: Zarr's default (zstd); "fast": blosc lz4 + shuffle; False: none
    chunking: str = "shard"  # "shard" (1 per layer/block, a shard of neurons, the rest whole), "rows" or "whole"
    contract: bool = False  # named in the public contract (CONTRACT.md)
    requires: str = ""  # only in stores with this feature (`features`): "gated" MLP neurons, "strata" on,
    # "logits" (the root attribute `logit_effects`: a model with an unembedding)
    optional: bool = False  # absent from stores made before it (readers and repairs do without it)


def _a(path, dtype, dims, fill=None, **kw) -> ArraySpec:
    return ArraySpec(path, dtype, tuple(dims.split()), fill, **kw)


# coordinates: the model's layer index of each store row, and each window column's offset from the
# max token; xarray reads them as the coordinates of `layer` and `offset` (optional, no schema
# bump: stores made before them lack them, and no reader of ours needs them)
LAYER = _a("layer", "int32", "layer", -1, chunking="whole", optional=True)
OFFSET = _a("offset", "int32", "offset", 0, chunking="whole", optional=True)  # -before .. after: the columns of topk/window
TOKENS = _a("tokens", "int32", "sequence position", 0, chunking="rows", contract=True)
VOCAB = _a("vocab", "str", "token", chunking="whole", contract=True)
TOPK_ACT = _a("topk/act", "float32", "layer neuron example", np.nan, contract=True)
TOPK_SEQ = _a("topk/seq", "int32", "layer neuron example", -1, contract=True)
TOPK_POS = _a("topk/pos", "int32", "layer neuron example", -1, contract=True)
EMBEDDINGS = _a("embeddings", "embedding", "layer neuron example d_embed", 0, compress=False, contract=True)
TOPK_WINDOW = _a("topk/window", "float32", "layer neuron example offset", np.nan, compress="fast")  # for the explorer
LABELS = _a("clusters/labels", "int32", "layer neuron example", -1, contract=True)
LINKAGE = _a("clusters/linkage", "float32", "layer neuron link link_field", np.nan, contract=True)
METRICS = ("n_examples", "n_clusters", "max_distance", "mean_distance", "mean_intra", "mean_inter")
METRIC_ARRAYS = {m: _a(f"metrics/{m}", "int32" if m in ("n_examples", "n_clusters") else "float32", "layer neuron",
                       0 if m in ("n_examples", "n_clusters") else np.nan, contract=True) for m in METRICS}
# not in the contract: the weights the embeddings were made with, and the scan's partial results
W_IN = _a("weights/W_in", "float32", "layer d_model neuron", 0, compress=False)
B_IN = _a("weights/b_in", "float32", "layer neuron", 0)
W_GATE = _a("weights/W_gate", "float32", "layer d_model neuron", 0, compress=False, requires="gated")
B_GATE = _a("weights/b_gate", "float32", "layer neuron", 0, requires="gated")
WEIGHTS = {"W_in": W_IN, "b_in": B_IN, "W_gate": W_GATE, "b_gate": B_GATE}
# not in the contract: logit effects (tasks/logits.py, core/logits.py), only in stores of models with an
# unembedding: what each unit writes to the residual stream, the folded unembedding, and per unit the
# N_LOGITS tokens of largest and of smallest W_out[j] @ W_U (tokens -1 and values NaN until computed)
W_OUT = _a("weights/W_out", "float32", "layer neuron d_resid", 0, compress=False, requires="logits", optional=True)
W_U = _a("weights/W_U", "float32", "d_resid token", np.nan, compress=False, chunking="whole", requires="logits",
         optional=True)
LOGITS = {name: _a(f"logits/{name}", "int32" if name.endswith("tokens") else "float32", "layer neuron logit_rank",
                   -1 if name.endswith("tokens") else np.nan, requires="logits", optional=True)
          for name in ("top_tokens", "top_values", "bottom_tokens", "bottom_values")}
SCAN_FIELDS = ("key", "act", "seq", "pos", "x", "win")  # a scan block's partial top-k table, by slot
SCAN = {
    "key": _a("scan/key", "float64", "block layer neuron example", -np.inf),
    "act": _a("scan/act", "float32", "block layer neuron example", np.nan),
    "seq": _a("scan/seq", "int32", "block layer neuron example", -1),
    "pos": _a("scan/pos", "int32", "block layer neuron example", -1),
    "x": _a("scan/x", "embedding", "block layer neuron example d_model", 0, compress=False),
    "win": _a("scan/win", "float32", "block layer neuron example offset", np.nan, compress="fast"),
}
SCAN_MAX = _a("scan/max", "float32", "block layer neuron", -np.inf, chunking="whole")
# --strata (not in the contract): per scan block, the strata's partial tables (stratum by stratum),
# the activation histograms and sums; then the merged strata, their clustering with the top-k, and
# each unit's activation distribution
SCAN_STRATA = {
    "key": _a("scan/strata_key", "float64", "block layer neuron stratum_example", -np.inf, requires="strata"),
    "act": _a("scan/strata_act", "float32", "block layer neuron stratum_example", np.nan, requires="strata"),
    "seq": _a("scan/strata_seq", "int32", "block layer neuron stratum_example", -1, requires="strata"),
    "pos": _a("scan/strata_pos", "int32", "block layer neuron stratum_example", -1, requires="strata"),
    "x": _a("scan/strata_x", "embedding", "block layer neuron stratum_example d_model", 0, compress=False,
            requires="strata"),
    "win": _a("scan/strata_win", "float32", "block layer neuron stratum_example offset", np.nan, compress="fast",
              requires="strata"),
}
SCAN_HIST = _a("scan/hist", "int64", "block layer neuron bin", 0, requires="strata")
SCAN_SUM = _a("scan/sum", "float64", "block layer neuron", 0, requires="strata")
SCAN_COUNT = _a("scan/count", "int64", "block", 0, requires="strata")  # tokens each row's distribution counted
STRATA_ACT = _a("strata/act", "float32", "layer neuron stratum_example", np.nan, requires="strata")
STRATA_SEQ = _a("strata/seq", "int32", "layer neuron stratum_example", -1, requires="strata")
STRATA_POS = _a("strata/pos", "int32", "layer neuron stratum_example", -1, requires="strata")
STRATUM = _a("strata/stratum", "int32", "layer neuron stratum_example", -1, requires="strata")
STRATA_EMBEDDINGS = _a("strata/embeddings", "embedding", "layer neuron stratum_example d_embed", 0, compress=False,
                       requires="strata")
STRATA_WINDOW = _a("strata/window", "float32", "layer neuron stratum_example offset", np.nan, compress="fast",
                   requires="strata")
SPECTRUM_LABELS = _a("strata/labels", "int32", "layer neuron spectrum_example", -1, requires="strata")
SPECTRUM_COUNTS = _a("strata/counts", "int32", "layer neuron spectrum_cluster source", 0, requires="strata")
SPECTRUM_CLUSTERS = _a("strata/n_clusters", "int32", "layer neuron source", 0, requires="strata")
SPECTRUM_DISTANCE = _a("strata/mean_distance", "float32", "layer neuron source", np.nan, requires="strata")
BELOW_ONLY = _a("strata/below_only", "int32", "layer neuron", 0, requires="strata")
HIST = _a("distribution/hist", "int64", "layer neuron bin", 0, requires="strata")
POSITIVE = _a("distribution/positive_fraction", "float32", "layer neuron", np.nan, requires="strata")
MEAN = _a("distribution/mean", "float32", "layer neuron", np.nan, requires="strata")
MAX = _a("distribution/max", "float32", "layer neuron", np.nan, requires="strata")
STRATA_ARRAYS = (*SCAN_STRATA.values(), SCAN_HIST, SCAN_SUM, SCAN_COUNT, STRATA_ACT, STRATA_SEQ, STRATA_POS, STRATUM,
                 STRATA_EMBEDDINGS, STRATA_WINDOW, SPECTRUM_LABELS, SPECTRUM_COUNTS, SPECTRUM_CLUSTERS,
                 SPECTRUM_DISTANCE, BELOW_ONLY, HIST, POSITIVE, MEAN, MAX)
# not in the contract: similar clusters (tasks/similar.py); slots c >= n_clusters stay empty
CENTROIDS = _a("similar/centroids", "embedding", "layer neuron cluster d_embed", 0, compress="fast")
TOP_TOKEN = _a("similar/top_token", "int32", "layer neuron cluster", -1)
TOP_COUNT = _a("similar/top_count", "int32", "layer neuron cluster", 0)
NEIGHBOURS = _a("similar/neighbours", "int32", "layer neuron cluster neighbour neighbour_field", -1)
COSINE = _a("similar/cosine", "float32", "layer neuron cluster neighbour", np.nan)

ARRAYS: tuple[ArraySpec, ...] = (
    LAYER, OFFSET, TOKENS, VOCAB, TOPK_ACT, TOPK_SEQ, TOPK_POS, EMBEDDINGS, TOPK_WINDOW, LABELS, LINKAGE,
    *METRIC_ARRAYS.values(), W_IN, B_IN, W_GATE, B_GATE, *SCAN.values(), SCAN_MAX,
    CENTROIDS, TOP_TOKEN, TOP_COUNT, NEIGHBOURS, COSINE, W_OUT, W_U, *LOGITS.values(), *STRATA_ARRAYS)
BY_PATH = {a.path: a for a in ARRAYS}
CONTRACT = tuple(a.path for a in ARRAYS if a.contract)


def features(attrs: dict) -> set[str]:
    """The optional parts a store with these root attributes has (`ArraySpec.requires`)."""
    return {name for name, on in (("gated", attrs.get("gated", False)), ("strata", attrs.get("strata")),
                                  ("logits", attrs.get("logit_effects", False))) if on}


def has(spec: ArraySpec, feats: set[str]) -> bool:
    return not spec.requires or spec.requires in feats


def sizes(n_layers: int, d_mlp: int, d_model: int, d_embed: int, k: int, n_sequences: int, ctx_len: int,
          d_vocab: int, n_blocks: int, n_strata: int = 0, strata_k: int = 0, hist_bins: int = 0,
          d_resid: int | None = None) -> dict[str, int]:
    """The size of every dimension for a run (`d_resid`: the model's residual width, default d_model)."""
    return {"stratum_example": n_strata * strata_k, "spectrum_example": k + n_strata * strata_k,
            "spectrum_cluster": k + n_strata * strata_k, "source": 1 + n_strata, "bin": hist_bins,
            "d_resid": d_model if d_resid is None else d_resid, "logit_rank": N_LOGITS,
            "sequence": n_sequences, "position": ctx_len, "token": d_vocab, "layer": n_layers, "neuron": d_mlp,
            "example": k, "cluster": k, "link": k - 1, "link_field": 4, "d_model": d_model, "d_embed": d_embed,
            "offset": sum(WINDOW) + 1,
            "block": n_blocks, "neighbour": N_SIMILAR, "neighbour_field": 3}


def shape(spec: ArraySpec, dim_sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(dim_sizes[d] for d in spec.dims)


def chunks(spec: ArraySpec, dim_sizes: dict[str, int], shard_size: int) -> tuple[int, ...]:
    """Chunk shape: aligned to a neuron shard and a scan block ("shard"), ~1 MiB of token rows
    ("rows"), or the whole array below its first dimension ("whole")."""
    full = shape(spec, dim_sizes)
    if spec.chunking == "rows":
        n, t = full
        return (min(n, max(1, 2**20 // t)), t)
    if spec.chunking == "whole":
        return (1, *full[1:]) if len(full) > 1 else full
    per_dim = {"layer": 1, "block": 1, "neuron": min(shard_size, dim_sizes["neuron"])}
    return tuple(per_dim.get(d, n) for d, n in zip(spec.dims, full))


def nbytes(dim_sizes: dict[str, int], embedding_dtype: str, feats: set[str] = frozenset(), str_bytes: int = 16) -> int:
    """Uncompressed bytes of every array of a store with these sizes and features (an upper bound
    on its size on disk; `str` entries counted as `str_bytes` each)."""
    total = 0
    for spec in ARRAYS:
        if not has(spec, feats):
            continue
        dtype = embedding_dtype if spec.dtype == "embedding" else spec.dtype
        itemsize = str_bytes if dtype == "str" else np.dtype(dtype).itemsize
        total += int(np.prod([dim_sizes[d] for d in spec.dims], dtype=object)) * itemsize
    return total
