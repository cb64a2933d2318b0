"""What the explorer's pages read from a store.

A neuron page reads one neuron's row of `topk/*`, `clusters/*`, `embeddings`, `topk/window` and
`similar/*` (each a read of the one chunk holding it), the tokens of its examples' sequences, and
nothing else. The overview reads the `metrics/*` arrays ([layers, neurons]; read once, cached).
Search uses each cluster's top token (`similar/top_token`, written by the `centroids` stage; for a
store without it, computed here once and cached in the store's state directory).

A live store (a run still writing it) is followed: whenever its markers change, everything cached
is dropped and read again (`refresh`), and pages say how far the run is. Data that cannot be read
(a chunk that does not decode) or that the markers say was written but is gone or resized raises
`Unavailable`, which the app shows as a message: never an error page, never fill values shown as data.
"""
from __future__ import annotations

import io
import json
import random
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.plan import NeuronShard, neuron_shards
from neuron_embeddings.core.summary import rank_neurons
from neuron_embeddings.storage import integrity, schema
from neuron_embeddings.storage.lock import is_live
from neuron_embeddings.storage.schema import METRICS, READABLE_VERSIONS
from neuron_embeddings.storage.store import Store, window

# the per-neuron arrays a neuron page reads (one chunk each); the window and similar/* ones only
# where the store has them
NEURON_ARRAYS = (schema.TOPK_ACT, schema.TOPK_SEQ, schema.TOPK_POS, schema.LABELS, schema.LINKAGE,
                 schema.EMBEDDINGS)
TOP_TOKENS_CACHE = "top_tokens.npz"  # the explorer's token index, for a store without similar/top_token

TOKENS_IN_MEMORY = 256 * 2**20  # read the whole tokens array once when it is at most this big
REFRESH_S = 2.0  # look at the store's markers at most this often
# the arrays a neuron page reads that the stage run once (prepare) wrote
PAGE_PREPARED = (schema.TOKENS.path, schema.VOCAB.path)
REPAIR_HINT = "rerun the run's command to repair the store (`neuron-embeddings status --verify` lists the damage)"


class Unavailable(Exception):
    """Data a page needs cannot be shown (damaged, or not computed yet); the message says why. The
    app answers with a page that shows it (status 200: the page is the right answer)."""

    def __init__(self, message: str, status: int = 200):
        super().__init__(message)
        self.status = status


@dataclass
class RunProgress:
    """How far the run that writes a store is, from its plan and markers."""
    complete: int
    total: int
    failed: int
    live: bool  # a run holds the store's writer lock

    @property
    def done(self) -> bool:
        return self.complete >= self.total

    def message(self) -> str:
        n = f"{self.complete} of {self.total} shards complete"
        if self.live:
            return f"A run is writing this store: {n}. Pages update as shards complete."
        failed = f", {self.failed} failed" if self.failed else ""
        return f"This store is incomplete: {n}{failed}. Rerun the run's command to finish it."


# --- pure helpers -----------------------------------------------------------------------------


def centrality(emb_nD: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each of n embeddings to the n-1 others: float64 [n] (0 for n = 1).
    Zero vectors count as orthogonal to everything."""
    e = np.asarray(emb_nD, dtype=np.float64)
    n = len(e)
    if n < 2:
        return np.zeros(n)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    u = e / np.where(norm == 0, 1.0, norm)
    total_n = u @ u.sum(axis=0)  # sum over all j of cos(i, j), including j = i
    return (total_n - (norm[:, 0] > 0)) / (n - 1)


def central_first(slots_n: np.ndarray, emb_nD: np.ndarray) -> list[int]:
    """The slots of a cluster with its most central example first, then the others in slot order
    (activation descending)."""
    slots = [int(s) for s in slots_n]
    if len(slots) < 2:
        return slots
    cent = centrality(emb_nD)
    c = int(np.flatnonzero(cent >= cent.max() - 1e-9)[0])  # ties (always for 2 examples): the first
    return [slots[c]] + slots[:c] + slots[c + 1:]


def is_wordpiece(vocab: np.ndarray) -> bool:
    """True for a WordPiece vocabulary (BERT: continuation tokens start with '##')."""
    return sum(str(t).startswith("##") for t in vocab[:50000]) > 0.01 * min(len(vocab), 50000)


# How WordPiece pieces join back into text. BERT's tokenizer splits off every punctuation mark and
# its own decode puts a space between all pieces but "##" continuations ("don ' t", "e - mail"), so
# the explorer joins them by this rule instead: "##x" continues the word; closing marks attach to
# the word before; opening brackets and joiners to the word after; "'" and a contraction's ending
# ("don't", "foo's", "we'll") to both; "." and "," between digits ("3.5", "1,000") to both.
_CLOSING = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%"}
_OPENING = {"(", "[", "{", "$", "#", "@"}
_JOINERS = {"-", "/", "_", "\\", "~"}
_CONTRACTIONS = {"t", "s", "d", "m", "ll", "re", "ve"}


def display_texts(texts: list[str], wordpiece: bool) -> list[str]:
    """Token strings as they read in running text: byte-level BPE strings already carry their
    spaces; WordPiece tokens get a space before them unless the rule above joins them."""
    if not wordpiece:
        return list(texts)
    out = []
    for i, t in enumerate(texts):
        prev, nxt = (texts[i - 1] if i else None), (texts[i + 1] if i + 1 < len(texts) else None)
        if t.startswith("##"):
            out.append(t[2:])
        elif i == 0 or _joins(prev, t, nxt, texts[i - 2] if i > 1 else None):
            out.append(t)
        else:
            out.append(" " + t)
    return out


def _joins(prev: str, t: str, nxt: str | None, before_prev: str | None) -> bool:
    """Whether token `t` attaches to the token before it (no space between)."""
    if t in _CLOSING and not (t in ".," and _digit_between(prev, nxt)):
        return True
    if prev in _OPENING or prev in _JOINERS or t in _JOINERS:
        return True
    if t == "'" and nxt in _CONTRACTIONS:
        return True
    if prev == "'" and t in _CONTRACTIONS and before_prev is not None:
        return True
    return t in ".," and _digit_between(prev, nxt) or (prev in (".", ",") and _digit_between(before_prev, t))


def _digit_between(a: str | None, b: str | None) -> bool:
    return bool(a and b and a[-1:].isdigit() and b.lstrip("#")[:1].isdigit())


# --- what a page gets -------------------------------------------------------------------------


@dataclass
class Token:
    text: str
    act: float  # NaN where unknown
    is_max: bool


@dataclass
class Example:
    slot: int
    act: float
    seq: int
    pos: int
    tokens: list[Token]
    central: bool = False
    copies: list[int] = field(default_factory=list)  # slots of the other examples with this same window
    source: int = 0  # where it comes from (--strata): 0 = the top-k, 1 + i = stratum i


def distinct_windows(examples: list[Example]) -> list[Example]:
    """Each distinct window once, in order: an example whose window reads the same as an earlier
    one's (the same text, the same max token; e.g. one passage in two sequences of the corpus)
    becomes a copy of it (`copies`) instead of a line of its own."""
    first: dict[tuple, Example] = {}
    for e in examples:
        key = tuple((t.text, t.is_max) for t in e.tokens)
        if key in first:
            first[key].copies.append(e.slot)
        else:
            first[key] = e
    return list(first.values())


@dataclass
class Neighbour:
    layer: int
    neuron: int
    cluster: int
    cosine: float
    token: str  # the neighbour cluster's top token ('' if unknown)


@dataclass
class ClusterView:
    label: int
    size: int
    top_tokens: list[tuple[str, int]]  # (token text, examples peaking on it), most frequent first
    examples: list[Example]
    similar: list[Neighbour] = field(default_factory=list)


@dataclass
class NeuronView:
    row: int
    layer: int
    neuron: int
    metrics: dict
    max_act: float
    clusters: list[ClusterView]
    unclustered: list[Example]
    linkage: np.ndarray  # float64 [n-1, 4] over the clustered examples
    leaf_slots: np.ndarray  # int [n]: the slot of each clustered example (the linkage's leaves)
    leaf_labels: np.ndarray  # int [n]
    leaf_names: list[str]  # the max token of each clustered example
    similar_state: str  # "ready", "pending" (not computed yet), "off" (--no-similar), "absent" (no similar/*)
    logits: dict | None = None  # {"top": [(token text, value)], "bottom": [...]} where the store has them


@dataclass
class SpectrumCluster:
    label: int
    counts: list[int]  # its examples by source: the top-k, then each stratum
    examples: list[Example]  # each with its `source`

    @property
    def below_only(self) -> bool:
        return self.counts[0] == 0


@dataclass
class SpectrumView:
    """A unit's behaviours across its activation spectrum (--strata): its histogram and the
    clusters of its top-k and strata examples together."""

    sources: list[str]  # the name of each source: "top-k", then each stratum's interval
    intervals: list[tuple[float, float]]  # each stratum's (low, high) fraction of the maximum
    hist: np.ndarray  # int [bins] activations in (i/bins, (i+1)/bins] x max
    max: float
    mean: float
    positive_fraction: float
    topk_min: float  # the weakest top-k example's activation (NaN if none)
    clusters: list[SpectrumCluster]
    n_clusters: list[int]  # clusters with an example from each source
    mean_distance: list[float]  # mean distance among each source's examples
    below_only: int  # clusters with no top-k example


class ExplorerData:
    """A store opened read-only for the explorer (writes only its own cache under `_explorer/`)."""

    def __init__(self, url: str, zarr_store=None):
        """`zarr_store`: read the arrays through this Zarr store instead of opening `url` (tests
        count the chunks a page reads with it)."""
        self.store = Store(url)
        try:
            attrs = self.store.attrs if self.store.exists() else {}
        except (OSError, ValueError, KeyError):  # noqa: BLE001 - any unreadable group means "not a store"
            attrs = {}
        if attrs.get("schema_version") not in READABLE_VERSIONS:
            raise UserError(f"{url} is not a neuron-embeddings store; give the --out path of a "
                            "`neuron-embeddings run` or `demo`")
        self.url, self.attrs = str(url), attrs
        self.group = self.store.open_read_only(zarr_store)
        self.layers: list[int] = [int(x) for x in attrs["layers"]]
        self.unit = attrs.get("unit", "mlp-neuron")
        self.unit_word = "feature" if self.unit == "sae-feature" else "neuron"
        self.d_mlp, self.k = int(attrs["d_mlp"]), int(attrs["k"])
        self.window = window(self.store)
        self.has_window = self._has(schema.TOPK_WINDOW)
        self.has_similar = self._has(schema.NEIGHBOURS)
        self.has_strata = bool(attrs.get("strata")) and self._has(schema.SPECTRUM_LABELS)
        self.has_logits = bool(attrs.get("logit_effects")) and self._has(schema.LOGITS["top_tokens"])
        self._lock = threading.Lock()
        self.refresh_s = REFRESH_S
        self.version = 0  # counts refreshes: the app's own caches key on it
        self._stamp, self._checked = None, -1e9
        self.progress: RunProgress | None = None
        self._counts: tuple[int, int, int] | None = None
        self._states: dict[str, dict[str, str]] = {}
        self._records: dict[tuple[str, str], dict] = {}
        self.damaged: dict[tuple[str, str], str] = {}
        self.refresh()

    # --- following a live store ---

    def refresh(self, force: bool = False) -> bool:
        """Drop every cached value when the store's markers changed since the last look (at most
        every `refresh_s` seconds unless `force`); True when they had."""
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return False
        with self._lock:
            self._checked = now
            stamp = self.store.marker_stamp()
            changed = stamp != self._stamp
            if changed:
                for name in ("metrics", "vocab", "wordpiece", "_tokens", "top_tokens", "_cluster_sizes", "below_only"):
                    self.__dict__.pop(name, None)
                type(self).neuron.cache_clear()
                type(self).spectrum.cache_clear()
                self._states = {stage: self.store.marker_states(stage) for stage in self.store.marker_stages()}
                self._records = {}
                self._counts = self._count_units()
                self._stamp = stamp
                self.version += 1
            self.progress = self._progress()
            if changed:  # the whole store's chunks: once the run is over (a live run's shards are checked per page)
                live = self.progress is not None and self.progress.live
                self.damaged = integrity.damaged_units(self.store) if stamp and not live else {}
            return changed

    def _record(self, stage: str, unit: str) -> dict:
        """A complete unit's marker record (kept until the markers change)."""
        if (stage, unit) not in self._records:
            try:
                rec = json.loads(self.store.marker_record(stage, unit))
            except (OSError, ValueError):
                rec = {}
            self._records[(stage, unit)] = rec if isinstance(rec, dict) else {}
        return self._records[(stage, unit)]

    def _count_units(self) -> tuple[int, int, int] | None:
        """(complete, failed, total) units of the run's plan; None without a plan (older versions)."""
        plan = self.store.read_plan()
        if not plan:
            return None
        complete = failed = 0
        for stage, units in plan.items():
            states = self._states.get(stage, {})
            complete += sum(1 for u in units if states.get(u) == "complete")
            failed += sum(1 for u in units if states.get(u) == "failed")
        return complete, failed, sum(len(u) for u in plan.values())

    def _progress(self) -> RunProgress | None:
        """The run's progress; None when the store is complete or has no plan."""
        if self._counts is None or self._counts[0] >= self._counts[2]:
            return None
        complete, failed, total = self._counts
        return RunProgress(complete, total, failed, live=is_live(self.url))

    def banner(self) -> list[str]:
        """Lines every page shows above its content: the run's progress, damage found."""
        out = [self.progress.message()] if self.progress is not None else []
        if self.damaged:
            (stage, unit), msg = next(iter(sorted(self.damaged.items())))
            more = f" (and {len(self.damaged) - 1} more shards)" if len(self.damaged) > 1 else ""
            out.append(f"This store is damaged: {stage} shard {unit}: {msg}{more}. Figures over the whole "
                       f"store leave that data out; {REPAIR_HINT}.")
        return out

    def _read(self, path: str, sel=Ellipsis) -> np.ndarray:
        """A selection of an array; Unavailable when its chunks cannot be read."""
        try:
            a = self.group[path]
            return a[sel] if not isinstance(sel, tuple) or not sel or not isinstance(sel[0], np.ndarray) \
                else a.get_orthogonal_selection(sel)
        except Exception as e:  # noqa: BLE001 - any failure to read or decode a chunk
            raise Unavailable(f"The store's array {path} cannot be read ({type(e).__name__}: {e}); "
                              f"{REPAIR_HINT}.") from e

    def check_neuron(self, layer: int, neuron: int) -> None:
        """Unavailable unless the neuron's shard is clustered and the chunks the markers of its
        shard (and of the prepare stage's tokens) record are all there at their written size.
        Stores without markers are taken as they are."""
        row = self.check(layer, neuron)
        size = self.store.settings().shard_size
        start = neuron // size * size
        unit = NeuronShard(row, self.layers[row], start, min(start + size, self.d_mlp)).id
        states = self._states
        if not any(states.values()):
            return  # no markers at all (a store copied without its state): nothing to check against
        if states.get("cluster", {}).get(unit) != "complete":
            where = f" {self.progress.message()}" if self.progress is not None else ""
            raise Unavailable(f"Layer {layer} {self.unit_word} {neuron} is not computed yet: its shard {unit} "
                              f"is not clustered.{where}")
        records = {}
        for stage, st in states.items():
            for u in (unit, "all"):
                if st.get(u) == "complete":
                    rec = self._record(stage, u)
                    if u == "all":  # a stage run once (prepare): only the arrays a page reads
                        rec = {**rec, "chunks": {k: v for k, v in (rec.get("chunks") or {}).items()
                                                 if k.split("/c/")[0] in PAGE_PREPARED}}
                    records[(stage, u)] = rec
        damaged, _ = integrity.check_records(self.store, records)
        if damaged:
            (stage, u), msg = next(iter(sorted(damaged.items())))
            raise Unavailable(f"Layer {layer} {self.unit_word} {neuron} cannot be shown: the store is damaged "
                              f"({stage} shard {u}: {msg}); {REPAIR_HINT}.")

    def _has(self, spec: schema.ArraySpec) -> bool:
        """Whether the store has the array (older stores lack `topk/window` and `similar/*`)."""
        try:
            return spec.path in self.group
        except (KeyError, OSError, ValueError):
            return False

    # --- small whole arrays, cached ---

    @cached_property
    def metrics(self) -> dict[str, np.ndarray]:
        """Every metrics/* array, [n_rows, d_mlp]."""
        return {m: self._read(schema.METRIC_ARRAYS[m].path) for m in METRICS}

    @cached_property
    def vocab(self) -> np.ndarray:
        return self._read(schema.VOCAB.path)

    @cached_property
    def wordpiece(self) -> bool:
        return is_wordpiece(self.vocab)

    @cached_property
    def _tokens(self):
        a = self.group[schema.TOKENS.path]
        return self._read(schema.TOKENS.path) if a.nbytes <= TOKENS_IN_MEMORY else a

    def _rows(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct sequence indices >= 0, their token rows [R, ctx_len])."""
        rows = np.unique(np.asarray(seqs)[np.asarray(seqs) >= 0])
        t = self._tokens
        got = t[rows] if isinstance(t, np.ndarray) else self._read(schema.TOKENS.path, (rows, slice(None)))
        return rows, got

    def token_rows(self, seqs: np.ndarray) -> dict[int, np.ndarray]:
        """{sequence index: its row of token ids} for the given sequences."""
        rows, got = self._rows(seqs)
        return {int(s): got[i] for i, s in enumerate(rows)}

    def peak_tokens(self, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """int32 token id at each (seq, pos); -1 where seq < 0."""
        out = np.full(seq.shape, -1, dtype=np.int32)
        ok = seq >= 0
        if ok.any():
            rows, got = self._rows(seq[ok])
            out[ok] = got[np.searchsorted(rows, seq[ok]), pos[ok]]
        return out

    # --- addressing ---

    def row_of(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in this store (layers {self.layers})")
        return self.layers.index(layer)

    def check(self, layer: int, neuron: int) -> int:
        row = self.row_of(layer)
        if not 0 <= neuron < self.d_mlp:
            raise KeyError(f"{self.unit_word} {neuron} is out of range (0-{self.d_mlp - 1})")
        return row

    def step(self, layer: int, neuron: int, delta: int) -> tuple[int, int]:
        """The neuron `delta` places away in store order (layer by layer), wrapping around."""
        flat = (self.row_of(layer) * self.d_mlp + neuron + delta) % (len(self.layers) * self.d_mlp)
        return self.layers[flat // self.d_mlp], flat % self.d_mlp

    def random_neuron(self, rng: random.Random | None = None) -> tuple[int, int]:
        """A random neuron with at least 2 clustered examples (any neuron if none has)."""
        rng = rng or random.Random()
        rows, cols = np.nonzero(self.metrics["n_examples"] >= 2)
        if rows.size == 0:
            return self.layers[rng.randrange(len(self.layers))], rng.randrange(self.d_mlp)
        i = rng.randrange(rows.size)
        return self.layers[int(rows[i])], int(cols[i])

    # --- one neuron ---

    def read_neuron(self, row: int, j: int) -> dict[schema.ArraySpec, np.ndarray]:
        """The neuron's slice of every per-neuron array the page shows (one chunk read each), by
        the array's spec (`storage.schema`)."""
        specs = list(NEURON_ARRAYS)
        if self.has_window:
            specs.append(schema.TOPK_WINDOW)
        if self.has_similar:
            specs += [schema.NEIGHBOURS, schema.COSINE]
        if self.has_logits:
            specs += list(schema.LOGITS.values())
        return {spec: self._read(spec.path, (row, j)) for spec in specs}

    def similar_state(self, row: int, j: int) -> str:
        if not self.has_similar:
            return "absent"
        if self.attrs.get("similar") is False:  # made with --no-similar
            return "off"
        size = self.store.settings().shard_size
        start = j // size * size
        unit = NeuronShard(row, self.layers[row], start, min(start + size, self.d_mlp)).id
        return "ready" if self.store.is_complete("similar", unit) else "pending"

    @cached_property
    def below_only(self) -> np.ndarray:
        """int [n_rows, d_mlp]: each unit's behaviours found only below its top-k (--strata)."""
        return self._read(schema.BELOW_ONLY.path)

    @lru_cache(maxsize=128)
    def spectrum(self, layer: int, neuron: int) -> SpectrumView | None:
        """The unit's behaviours across the spectrum, or None for a store without --strata."""
        if not self.has_strata:
            return None
        row = self.check(layer, neuron)
        # the top-k's fields its examples need (not the embeddings, linkage or similar/* the page reads)
        a = {spec: self._read(spec.path, (row, neuron))
             for spec in (schema.TOPK_ACT, schema.TOPK_SEQ, schema.TOPK_POS, schema.TOPK_WINDOW)}
        st_ = {spec: self._read(spec.path, (row, neuron)) for spec in (
            schema.STRATA_ACT, schema.STRATA_SEQ, schema.STRATA_POS, schema.STRATUM, schema.STRATA_WINDOW,
            schema.SPECTRUM_LABELS, schema.SPECTRUM_COUNTS, schema.SPECTRUM_CLUSTERS, schema.SPECTRUM_DISTANCE,
            schema.HIST, schema.POSITIVE, schema.MEAN, schema.MAX)}
        k = self.k
        # the strata examples read like top-k ones: the same fields, numbered after the top-k's slots
        strata = {schema.TOPK_SEQ: st_[schema.STRATA_SEQ], schema.TOPK_POS: st_[schema.STRATA_POS],
                  schema.TOPK_ACT: st_[schema.STRATA_ACT], schema.TOPK_WINDOW: st_[schema.STRATA_WINDOW]}
        seq = np.concatenate([a[schema.TOPK_SEQ], strata[schema.TOPK_SEQ]])
        rows = self.token_rows(seq)
        max_act = float(st_[schema.MAX])
        labels, counts = st_[schema.SPECTRUM_LABELS], st_[schema.SPECTRUM_COUNTS]
        source = np.concatenate([np.zeros(k, dtype=int), 1 + np.maximum(st_[schema.STRATUM], 0)])

        def example(i: int) -> Example:
            e = (self.example(i, a, rows[int(seq[i])], max_act) if i < k
                 else self.example(i - k, strata, rows[int(seq[i])], max_act))
            e.slot, e.source = i, int(source[i])
            return e

        clusters = []
        for c in range(int(labels.max()) + 1 if (labels >= 0).any() else 0):
            idx = np.flatnonzero(labels == c)
            idx = idx[np.lexsort((idx, source[idx]))]  # the top-k's first, then stratum by stratum
            clusters.append(SpectrumCluster(c, counts[c].tolist(), [example(int(i)) for i in idx]))
        intervals = [tuple(iv) for iv in self.attrs["strata_intervals"]]
        acts = a[schema.TOPK_ACT]
        return SpectrumView(
            sources=["top-k", *(f"{lo:g}–{hi:g} × max" for lo, hi in intervals)], intervals=intervals,
            hist=st_[schema.HIST], max=max_act, mean=float(st_[schema.MEAN]),
            positive_fraction=float(st_[schema.POSITIVE]),
            topk_min=float(np.nanmin(acts)) if np.isfinite(acts).any() else float("nan"), clusters=clusters,
            n_clusters=st_[schema.SPECTRUM_CLUSTERS].tolist(), mean_distance=st_[schema.SPECTRUM_DISTANCE].tolist(),
            below_only=sum(c.below_only for c in clusters))

    def example(self, slot: int, a: dict, tokens_row: np.ndarray, max_act: float) -> Example:
        seq, pos, act = int(a[schema.TOPK_SEQ][slot]), int(a[schema.TOPK_POS][slot]), float(a[schema.TOPK_ACT][slot])
        before, after = self.window
        lo, hi = max(0, pos - before), min(len(tokens_row), pos + after + 1)
        ids = tokens_row[lo:hi]
        if schema.TOPK_WINDOW in a:
            acts = a[schema.TOPK_WINDOW][slot][lo - (pos - before):hi - (pos - before)]
        else:  # a store without window activations: only the max token's activation is known
            acts = np.where(np.arange(lo, hi) == pos, act, np.nan)
        texts = display_texts([str(self.vocab[t]) for t in ids], self.wordpiece)
        toks = [Token(t, float(v), lo + i == pos) for i, (t, v) in enumerate(zip(texts, acts))]
        return Example(slot, act, seq, pos, toks)

    def neighbours(self, a: dict, label: int) -> list[Neighbour]:
        out = []
        for (r, j, c), cos in zip(a[schema.NEIGHBOURS][label], a[schema.COSINE][label]):
            if r < 0:
                continue
            t = int(self.top_tokens[0][r, j, c])
            out.append(Neighbour(self.layers[int(r)], int(j), int(c), float(cos),
                                 str(self.vocab[t]) if t >= 0 else ""))
        return out

    @lru_cache(maxsize=128)
    def neuron(self, layer: int, neuron: int) -> NeuronView:
        """Everything the neuron page shows; clusters largest first, each central example first."""
        row = self.check(layer, neuron)
        a = self.read_neuron(row, neuron)
        labels, seq = a[schema.LABELS], a[schema.TOPK_SEQ]
        rows = self.token_rows(seq)
        acts = a[schema.TOPK_ACT]
        max_act = float(np.nanmax(acts)) if np.isfinite(acts).any() else float("nan")
        sim_state = self.similar_state(row, neuron)
        clusters = []
        for c in range(int(labels.max()) + 1 if (labels >= 0).any() else 0):
            slots = np.flatnonzero(labels == c)
            order = central_first(slots, a[schema.EMBEDDINGS][slots])
            exs = [self.example(s, a, rows[int(seq[s])], max_act) for s in order]
            exs[0].central = len(exs) > 1
            counts: dict[str, int] = {}
            for e in exs:
                t = next(t.text for t in e.tokens if t.is_max)
                counts[t] = counts.get(t, 0) + 1
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
            sim = self.neighbours(a, c) if sim_state == "ready" else []
            clusters.append(ClusterView(c, len(slots), top, distinct_windows(exs), sim))
        unclustered = distinct_windows([self.example(s, a, rows[int(seq[s])], max_act)
                                        for s in np.flatnonzero((labels < 0) & (seq >= 0))])
        leaf_slots = np.flatnonzero(labels >= 0)
        n = len(leaf_slots)
        names = [next(t.text for t in self.example(s, a, rows[int(seq[s])], max_act).tokens if t.is_max)
                 for s in leaf_slots]
        m = {k: self.metrics[k][row, neuron].item() for k in METRICS}
        return NeuronView(row, layer, neuron, m, max_act, clusters, unclustered,
                          np.asarray(a[schema.LINKAGE][:max(n - 1, 0)], dtype=np.float64),
                          leaf_slots, labels[leaf_slots], names, sim_state, self.logit_view(a))

    def logit_view(self, a: dict) -> dict | None:
        """The unit's most promoted and most suppressed tokens with their values (logits/*), or None
        where the store has none or they are not computed yet."""
        if schema.LOGITS["top_tokens"] not in a or not (a[schema.LOGITS["top_tokens"]] >= 0).any():
            return None
        return {side: [(str(self.vocab[t]), float(x)) for t, x in zip(a[schema.LOGITS[f"{side}_tokens"]],
                                                                       a[schema.LOGITS[f"{side}_values"]]) if t >= 0]
                for side in ("top", "bottom")}

    # --- overview ---

    def ranked(self, n: int = 20) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(layer, neuron) of the n most and n least polysemantic neurons (as the run's summary
        ranks them: clusters, then mean distance; neurons with at least k/2 examples)."""
        m = self.metrics
        most, least = rank_neurons(m["n_examples"], m["n_clusters"], m["mean_distance"],
                                   min_examples=max(2, self.k // 2))
        return ([(self.layers[r], j) for r, j in most[:n]], [(self.layers[r], j) for r, j in least[:n]])

    def settings_table(self) -> list[tuple[str, str]]:
        skip = {"schema_version"}
        return [(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                for k, v in sorted(self.attrs.items()) if k not in skip]

    # --- search by token ---

    @cached_property
    def top_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """(token, count) int32 [n_rows, d_mlp, k]: each cluster's most frequent peak token and how
        many of its examples peak on it; -1 / 0 where no such cluster."""
        if self.has_similar and self._all_complete("centroids"):
            return self._read(schema.TOP_TOKEN.path), self._read(schema.TOP_COUNT.path)
        return self._cached_top_tokens()

    def _all_complete(self, stage: str) -> bool:
        """Whether every neuron shard of a shard stage (`cluster`, `centroids`) is complete."""
        states = self.store.marker_states(stage)
        units = [s.id for s in neuron_shards(self.store.settings(), self.d_mlp)]
        return bool(units) and all(states.get(u) == "complete" for u in units)

    def _cached_top_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Computed from the whole store once; kept in the explorer's cache `top_tokens.npz`
        (in the store's state directory), valid while the set of complete cluster shards is unchanged."""
        from neuron_embeddings.core.similar import cluster_top_tokens  # imports torch: only when needed

        done = sorted(u for u, v in self.store.marker_states("cluster").items() if v == "complete")
        stamp = json.dumps(done)
        cached = self.store.read_explorer_cache(TOP_TOKENS_CACHE)
        if cached is not None:
            try:
                z = np.load(io.BytesIO(cached))
                if str(z["stamp"]) == stamp:
                    return z["token"], z["count"]
            except (OSError, KeyError, ValueError):
                pass
        labels, seq, pos = (self._read(spec.path) for spec in (schema.LABELS, schema.TOPK_SEQ, schema.TOPK_POS))
        L, M, K = labels.shape
        peak = self.peak_tokens(seq, pos)
        tok, cnt = cluster_top_tokens(labels.reshape(L * M, K), peak.reshape(L * M, K))
        tok, cnt = tok.reshape(L, M, K), cnt.reshape(L, M, K)
        try:
            buf = io.BytesIO()
            np.savez(buf, token=tok, count=cnt, stamp=np.array(stamp))
            self.store.write_explorer_cache(TOP_TOKENS_CACHE, buf.getvalue())
        except OSError:  # a read-only store: keep it in memory only
            pass
        return tok, cnt

    @cached_property
    def _cluster_sizes(self) -> np.ndarray:
        """int32 [n_rows, d_mlp, k]: examples in each cluster."""
        labels = self._read(schema.LABELS.path)
        L, M, K = labels.shape
        flat = labels.reshape(L * M, K)
        s_N, slot_N = np.nonzero(flat >= 0)
        sizes = np.bincount(s_N * K + flat[s_N, slot_N], minlength=L * M * K)
        return sizes.reshape(L, M, K).astype(np.int32)

    def matching_tokens(self, text: str) -> np.ndarray:
        """Token ids whose text equals `text` once surrounding whitespace is stripped (and a
        WordPiece '##' prefix); case-insensitive when nothing matches exactly."""
        q = text.strip()
        stripped = np.array([str(t).strip().removeprefix("##") if self.wordpiece else str(t).strip()
                             for t in self.vocab])
        ids = np.flatnonzero(stripped == q)
        if ids.size == 0:
            ids = np.flatnonzero(np.char.lower(stripped) == q.lower())
        return ids

    def search(self, text: str, limit: int = 200) -> tuple[list[str], list[dict]]:
        """Clusters whose examples most often peak on a token with this text, most examples first:
        (the matching token strings, [{layer, neuron, cluster, count, size}])."""
        ids = self.matching_tokens(text)
        if ids.size == 0:
            return [], []
        tok, cnt = self.top_tokens
        r, j, c = np.nonzero(np.isin(tok, ids))
        sizes = self._cluster_sizes[r, j, c]
        counts = cnt[r, j, c]
        order = np.lexsort((j, r, -sizes, -counts))[:limit]
        hits = [{"layer": self.layers[int(r[i])], "neuron": int(j[i]), "cluster": int(c[i]),
                 "count": int(counts[i]), "size": int(sizes[i]), "token": str(self.vocab[tok[r[i], j[i], c[i]]])}
                for i in order]
        return [str(self.vocab[i]) for i in ids], hits
