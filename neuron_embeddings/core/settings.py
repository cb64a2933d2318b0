"""The run's settings: every default and its validation, in one place.

`RunSettings` holds every option that changes what lands in the store (remembered in its root
attributes). `ExecSettings` holds the options that only change how fast it gets there (batch size,
device, workers, retries), which may differ between a run and its resumption. The CLI's options,
the flow's parameters and prefect.yaml take their defaults from here (`default`), and a test
checks them against it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from neuron_embeddings.core.errors import UserError

LINKAGES = ("average", "single", "complete", "weighted")
EMBEDDING_DTYPES = ("float16", "float32")
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # the forward's (core.models loads in these)
DEVICES = ("auto", "cpu", "cuda")


def layer_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    """'0-11', '3,5', '2-4,7' -> [(low, high), ...] inclusive, checked for syntax only and never
    expanded (so '0-99999999999' costs nothing); None or 'all' -> None (every layer)."""
    if spec is None or str(spec).strip() in ("", "all"):
        return None
    ranges = []
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--layers {spec!r} is not a layer list; write e.g. '0-11' or '3,5'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UserError(f"--layers {spec!r}: range {lo}-{hi} is empty; write low-high")
        ranges.append((lo, hi))
    return ranges


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'0-11', '3,5', '2-4,7' or None (all) -> sorted layer indices, checked against n_layers
    before any range is expanded."""
    ranges = layer_ranges(spec)
    if ranges is None:
        return list(range(n_layers))
    bad = [max(lo, n_layers) for lo, hi in ranges if hi >= n_layers]
    if bad:
        raise UserError(
            f"--layers {spec!r}: layer {min(bad)} is out of range, the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted({layer for lo, hi in ranges for layer in range(lo, hi + 1)})


def parse_selection(selection: str) -> float | None:
    """'top' -> None; 'band:F' -> F in (0, 1]."""
    if selection == "top":
        return None
    m = re.fullmatch(r"band:([0-9]*\.?[0-9]+)", selection)
    if not m or not 0 < float(m.group(1)) <= 1:
        raise UserError(f"--selection {selection!r} is not valid; use 'top' or 'band:F' with 0 < F <= 1, e.g. band:0.75")
    return float(m.group(1))


HIST_BINS = 20  # each unit's activation histogram (--strata): equal bins of (0, max], 5 per quarter
DEFAULT_STRATA = (0.75, 0.5, 0.25, 0.0)  # `--strata` alone: the four quarters of each unit's maximum


def parse_strata(spec) -> tuple[float, ...]:
    """'0.75,0.5,0.25,0' (or a sequence of numbers) -> strictly decreasing fractions in [0, 1];
    None or '' -> () (no strata). Interval i holds the activations in [f_i, f_(i-1)) x the unit's
    maximum, with f_0 = 1 and the first interval closed at the top."""
    if spec is None or spec == "" or spec == ():
        return ()
    parts = str(spec).split(",") if isinstance(spec, str) else list(spec)
    try:
        fractions = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"--strata {spec!r}: write decreasing fractions of the maximum, e.g. 0.75,0.5,0.25,0") from None
    if not all(0 <= f <= 1 for f in fractions) or any(a <= b for a, b in zip(fractions, fractions[1:])):
        raise UserError(f"--strata {spec!r}: the fractions must be strictly decreasing and in [0, 1], "
                        "e.g. 0.75,0.5,0.25,0")
    return fractions


def strata_intervals(fractions: tuple[float, ...]) -> list[tuple[float, float]]:
    """[(low, high), ...] fractions of the maximum of each stratum, top first."""
    return [(lo, hi) for lo, hi in zip(fractions, (1.0, *fractions))]


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides the content and layout of a store. Stored in its root attributes."""

    model: str
    dataset: str
    layers: tuple[int, ...]
    n_sequences: int = 1024
    ctx_len: int = 128
    k: int = 50
    selection: str = "top"
    shard_size: int = 256
    linkage: str = "average"
    threshold: float = 0.5
    seed: int = 0
    embedding_dtype: str = "float16"
    scan_blocks: int = 1
    sae: str | None = None  # an SAE directory: the store's units are its features (one row)
    similar: bool = True  # the `similar` stage: each cluster's nearest clusters of other units
    prepend_bos: bool = False  # each row is BOS + the next ctx_len - 1 tokens of the stream (resolved: bool)
    excluded_token_ids: tuple[int, ...] = ()  # tokens never chosen as an example's max token
    dtype: str = "float32"  # the model's forward (resolved: float32 on CPU, bfloat16 on GPU by default)
    strata: tuple[float, ...] = ()  # activation intervals sampled besides the top-k (parse_strata); () = none
    strata_k: int = 10  # examples sampled per stratum

    def __post_init__(self) -> None:
        object.__setattr__(self, "strata", parse_strata(self.strata))
        if self.strata_k < 1:
            raise UserError(f"--strata-k {self.strata_k}: need at least 1 example per stratum")
        if self.k < 2:
            raise UserError(f"--k {self.k}: need at least 2 examples per neuron to cluster; use --k 2 or more")
        if self.n_sequences < 1:
            raise UserError(f"--n-sequences {self.n_sequences}: need at least 1 sequence")
        if self.k > self.n_sequences:  # a neuron's examples are per-sequence maxima: one per sequence at most
            raise UserError(f"--k {self.k}: a neuron has at most one example per sequence, and --n-sequences is "
                            f"{self.n_sequences}; lower --k or raise --n-sequences")
        if self.ctx_len < 1:
            raise UserError(f"--ctx-len {self.ctx_len}: need at least 1 token per sequence")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size}: need at least 1 neuron per shard")
        if self.linkage not in LINKAGES:
            raise UserError(f"--linkage {self.linkage!r} is unknown; use one of {', '.join(LINKAGES)}")
        if not 0 < self.threshold <= 2:
            raise UserError(f"--threshold {self.threshold}: cosine distances lie in [0, 2]; use a value in (0, 2], e.g. 0.5")
        if self.dtype not in MODEL_DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: use one of {', '.join(MODEL_DTYPES)}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise UserError(f"--embedding-dtype {self.embedding_dtype!r}: use float16 or float32")
        if not 1 <= self.scan_blocks <= self.n_sequences:
            raise UserError(f"--scan-blocks {self.scan_blocks}: use 1 to --n-sequences ({self.n_sequences})")
        parse_selection(self.selection)
        if self.prepend_bos and self.ctx_len < 2:
            raise UserError(f"--ctx-len {self.ctx_len}: with --prepend-bos a row needs at least 2 tokens")
        if not self.layers:
            raise UserError("--layers selects no layer")

    @property
    def band_fraction(self) -> float | None:
        return parse_selection(self.selection)

    @property
    def needs_maxima(self) -> bool:
        """Whether the scan needs each unit's dataset maximum first (band selection, strata)."""
        return self.band_fraction is not None or bool(self.strata)

    def to_attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["excluded_token_ids"] = list(self.excluded_token_ids)
        d["strata"] = list(self.strata)
        return d

    @classmethod
    def from_attrs(cls, attrs: dict) -> "RunSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in attrs.items() if k in names}  # version-1 stores: no BOS, nothing excluded
        kw["layers"] = tuple(kw["layers"])
        kw["excluded_token_ids"] = tuple(kw.get("excluded_token_ids", ()))
        kw["strata"] = tuple(kw.get("strata") or ())
        return cls(**kw)

    def differences(self, other: "RunSettings") -> list[str]:
        """Names of the settings that differ, as `name: stored -> asked`."""
        a, b = self.to_attrs(), other.to_attrs()
        return [f"{k}: {a[k]!r} in the store, {b[k]!r} asked" for k in a if a[k] != b[k]]


DEFAULT_MODEL = "gpt2"
DEFAULT_DATASET = "builtin:python-docs"
# the demo's run (`neuron-embeddings demo` and the `demo` deployment): a real model that ships as a
# package, text on every Python install, minutes on 2 CPU cores
DEMO = dict(model="builtin:all-MiniLM-L6-v2", dataset="builtin:python-docs", n_sequences=768, ctx_len=128, k=50,
            shard_size=256)


@dataclass(frozen=True)
class ExecSettings:
    """How a run executes; free to change between a run and its resumption."""

    batch_size: int = 16
    device: str = "auto"
    workers: int = 1
    dask_address: str | None = None
    task_retries: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: need at least 1")
        if self.device not in DEVICES:
            raise UserError(f"--device {self.device!r}: use auto, cpu or cuda")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: need at least 1")
        if self.task_retries < 0:
            raise UserError(f"--task-retries {self.task_retries}: use 0 or more")


# run options that are not settings fields as such: resolved against the model into RunSettings
OPTION_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "dataset": DEFAULT_DATASET,
    "prepend_bos": None,  # None: on for causal models whose tokenizer has a BOS token, else off
    "exclude_special_tokens": True,  # the tokenizer's special tokens are never an example's max token
    "dtype": None,  # None: the store's when resuming, else float32 on CPU and bfloat16 on GPU
    "strata": None,  # None: no strata; '0.75,0.5,0.25,0' (DEFAULT_STRATA, what `--strata` alone gives): parse_strata
}


def default(name: str):
    """The default of a run option (`model`, `dataset`, `prepend_bos`, `exclude_special_tokens`,
    or a field of RunSettings or ExecSettings)."""
    if name in OPTION_DEFAULTS:
        return OPTION_DEFAULTS[name]
    for cls in (RunSettings, ExecSettings):
        for f in dataclasses.fields(cls):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
    raise KeyError(f"no default for run option {name!r}")


# --- SAE training (core.sae) -------------------------------------------------------------------

ARCHITECTURES = ("standard", "topk")
LN_UPDATES = ("ema", "mean")


@dataclass(frozen=True)
class SAETrainSettings:
    """What decides a trained SAE (validated here, stored in cfg.json)."""

    expansion: float = 4.0
    architecture: str = "standard"
    topk: int | None = None
    l1: float = 5.0
    ln_coef: float = 0.0
    ln_start: int = 0
    ln_momentum: float = 0.9
    ln_update: str = "ema"
    steps: int = 2000
    batch_size: int = 4096
    lr: float = 1e-3
    warmup: int | None = None  # default: 5% of the steps
    resample_every: int | None = None  # default: a fifth of the steps; 0 = never
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"--architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "topk" and (self.topk is None or self.topk < 1):
            raise UserError("--architecture topk needs --topk K with K >= 1")
        if self.architecture != "topk" and self.topk is not None:
            raise UserError("--topk is only for --architecture topk")
        if not 0 < self.expansion < float("inf"):
            raise UserError(f"--expansion {self.expansion}: use a positive factor, e.g. 4")
        checks = [("--l1", self.l1 >= 0, "use a value >= 0"), ("--ln-coef", self.ln_coef >= 0, "use a value >= 0"),
                  ("--ln-start", self.ln_start >= 0, "use a step >= 0"),
                  ("--ln-momentum", 0 <= self.ln_momentum < 1, "use a value in [0, 1)"),
                  ("--steps", self.steps >= 1, "need at least 1 step"),
                  ("--batch-size", self.batch_size >= 1, "need at least 1 activation per batch"),
                  ("--lr", self.lr > 0, "use a positive learning rate"),
                  ("--warmup", self.warmup is None or self.warmup >= 0, "use 0 or more steps"),
                  ("--resample-every", self.resample_every is None or self.resample_every >= 0, "use 0 (never) or more")]
        for name, ok, hint in checks:
            if not ok:
                raise UserError(f"{name} {getattr(self, name[2:].replace('-', '_'))}: {hint}")
        if self.ln_update not in LN_UPDATES:
            raise UserError(f"--ln-update {self.ln_update!r}: use ema or mean")

    def d_sae(self, d_in: int) -> int:
        """Features of the SAE on inputs of width d_in: expansion x d_in, at least 1."""
        return max(1, round(self.expansion * d_in))

    def check_fits(self, d_in: int) -> None:
        """The checks that need the input width: topk within the features."""
        if self.topk is not None and self.topk > self.d_sae(d_in):
            raise UserError(f"--topk {self.topk}: the SAE has only {self.d_sae(d_in)} features (--expansion "
                            f"{self.expansion:g} x {d_in} inputs); use --topk {self.d_sae(d_in)} or less")

    def train_nbytes(self, d_in: int) -> int:
        """Bytes training needs (float32): the weights with their gradients and two Adam moments,
        the L_N lookup when on, and about four [batch_size, d_sae] tensors per step."""
        d_sae = self.d_sae(d_in)
        params = 2 * d_in * d_sae + d_sae + d_in
        lookup = d_sae * d_in if self.ln_coef > 0 else 0
        return 4 * (4 * params + lookup + 4 * self.batch_size * d_sae)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else max(1, self.steps // 20)

    @property
    def resample_steps(self) -> list[int]:
        """Steps at which dead features are resampled: every `resample_every` steps, up to 3/4 of
        the run (a feature resampled later has no time to learn)."""
        every = self.resample_every if self.resample_every is not None else self.steps // 5
        if every <= 0:
            return []
        return list(range(every, int(0.75 * self.steps) + 1, every))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
