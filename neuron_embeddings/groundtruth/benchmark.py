"""The ground-truth benchmark: generate models with known features, select and embed examples,
cluster them over a sweep of linkages and thresholds, score against the truth, write the report.

``run_benchmark(out_dir, quick)`` is what ``neuron-embeddings benchmark ground-truth`` calls. The
configuration (``quick_config`` / ``full_config``) is plain data, recorded in ``results.json``.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from neuron_embeddings.groundtruth.measures import (
    NeuronExamples,
    by_path,
    evaluate,
    spearman_table,
    summarise,
)
from neuron_embeddings.groundtruth.planted import (
    PlantedVariant,
    planted_examples,
    unequal_scales,
)

DEFAULT_LINKAGE, DEFAULT_THRESHOLD = "average", 0.5
ALL_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
ALL_LINKAGES = ("average", "single", "complete", "weighted")
PER_NEURON_KEYS = ("n_examples", "n_present", "n_drivers", "n_clusters", "n_clusters_raw_x", "ari_embedding",
                   "ari_raw_x", "ari_input_identity", "ari_random", "max_distance", "mean_distance", "mean_intra",
                   "mean_inter")


@dataclass
class BenchConfig:
    """Everything the benchmark generates and sweeps."""

    name: str
    planted_variants: list[PlantedVariant]
    planted_seeds: list[int]
    toy_variants: dict[str, dict]
    toy_seeds: list[int]
    toy_eval: int = 20000
    selections: tuple[str, ...] = ("top", "band:0.5")
    k: int = 50
    thresholds: tuple[float, ...] = ALL_THRESHOLDS
    linkages: tuple[str, ...] = ALL_LINKAGES
    sae: dict | None = field(default_factory=dict)


def _planted_variants(d_mlp: int, n_docs: int) -> list[PlantedVariant]:
    base = dict(d_mlp=d_mlp)
    return [
        PlantedVariant("clean", base, n_docs=n_docs),
        PlantedVariant("shared-0.3", {**base, "shared_directions": 0.3}, n_docs=n_docs),
        PlantedVariant("shared-0.6", {**base, "shared_directions": 0.6}, n_docs=n_docs),
        PlantedVariant("unequal", {**base, "feature_scales": unequal_scales(6)}, n_docs=n_docs),
        PlantedVariant("noise-2", {**base, "noise": 2.0}, n_docs=n_docs),
        PlantedVariant("noise-4", {**base, "noise": 4.0}, n_docs=n_docs),
        PlantedVariant("gated", {**base, "gated": True}, n_docs=n_docs),
    ]


TOY_VARIANTS = {
    "base": {},
    "crowded": {"d_model": 10},
    "unequal": {"unequal_scales": True},
    "noise": {"noise": 0.1},
    "dense": {"p_active": 0.03},
}


def full_config() -> BenchConfig:
    return BenchConfig("full", _planted_variants(96, 1000), [0, 1, 2], dict(TOY_VARIANTS), [0, 1, 2],
                       sae=dict(steps=3000, seeds=[0, 1], ln_coefs=(0.0, 1e-3, 1e-2)))


def quick_config() -> BenchConfig:
    planted = [v for v in _planted_variants(48, 500) if v.name in ("clean", "shared-0.3", "gated")]
    return BenchConfig("quick", planted, [0], {"base": {"steps": 1500}}, [0], toy_eval=10000,
                       thresholds=(0.2, 0.5, 0.8), linkages=("average", "complete"),
                       sae=dict(steps=300, seeds=[0], ln_coefs=(0.0, 1e-2), toy={"steps": 1500}))


# --------------------------------------------------------------------------- running


def _jsonable(obj):
    """Plain JSON types; NaN and infinities become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return round(f, 6) if math.isfinite(f) else None
    if isinstance(obj, PlantedVariant):
        return _jsonable(asdict(obj))
    return obj


def sweep(ex: NeuronExamples, linkages, thresholds) -> list[dict]:
    """``summarise(evaluate(...))`` for every linkage and threshold."""
    rows = []
    for linkage in linkages:
        for threshold in thresholds:
            rows.append({"linkage": linkage, "threshold": threshold, **summarise(evaluate(ex, linkage, threshold))})
    return rows


def dataset_result(generator: str, variant: str, selection: str, ex: NeuronExamples, cfg: BenchConfig) -> dict:
    """Sweep, headline (default linkage and threshold), Spearman and per-neuron numbers of one dataset."""
    res = evaluate(ex, DEFAULT_LINKAGE, DEFAULT_THRESHOLD)
    out = {"generator": generator, "variant": variant, "selection": selection, "n_neurons": len(ex.act_NK),
           "default": summarise(res), "spearman": spearman_table(res),
           "per_neuron": {key: res[key] for key in PER_NEURON_KEYS},
           "sweep": sweep(ex, cfg.linkages, cfg.thresholds)}
    if "paths" in ex.info:  # gated: the whole embedding against each half, per path, at every threshold
        out["by_path"] = {str(t): by_path(evaluate(ex, DEFAULT_LINKAGE, t), ex.info["paths"]) for t in cfg.thresholds}
    if "stored_labels" in ex.info:  # planted: the pipeline's own clustering must equal ours
        out["pipeline_clusters_match"] = bool(np.array_equal(ex.info["stored_labels"], res["labels_NK"]))
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _n_steps(cfg: BenchConfig) -> int:
    planted = len(cfg.planted_variants) * len(cfg.selections) * (len(cfg.planted_seeds) + 1)
    toy = len(cfg.toy_variants) * (len(cfg.toy_seeds) + len(cfg.selections))
    sae = len(cfg.sae.get("seeds", [])) * len(cfg.sae.get("ln_coefs", ())) if cfg.sae else 0
    return planted + toy + sae


def run_benchmark(out_dir: str | Path, quick: bool = False, work_dir: str | Path | None = None,
                  progress: bool = True, command: str | None = None) -> dict:
    """Run the benchmark, write ``out_dir``/results.json, report.md and the PNG plots; return the results."""
    from tqdm import tqdm

    cfg = quick_config() if quick else full_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bar = tqdm(total=_n_steps(cfg), desc="ground truth", unit="step", disable=not progress, dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="ne-groundtruth-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        datasets = _planted_datasets(cfg, work, bar) + _toy_datasets(cfg, bar)
        sae = _sae_results(cfg, bar)
    bar.close()
    results = {"config": _jsonable(asdict(cfg)), "commit": _git_commit(), "machine": platform.platform(),
               "seconds": round(time.time() - t0, 1), "datasets": _jsonable(datasets), "sae": _jsonable(sae),
               "command": command or f"neuron-embeddings benchmark ground-truth {'--quick ' if quick else ''}--out {out_dir}"}
    (out / "results.json").write_text(json.dumps(results, separators=(",", ":")))
    from neuron_embeddings.groundtruth.report import write_report

    write_report(results, out)
    return results


def _planted_datasets(cfg: BenchConfig, work: Path, bar) -> list[dict]:
    out = []
    for variant in cfg.planted_variants:
        for selection in cfg.selections:
            bar.set_postfix_str(f"planted {variant.name} {selection}")
            parts = []
            for seed in cfg.planted_seeds:
                parts.append(planted_examples(work, variant, seed, selection, cfg.k))
                bar.update(1)
            ex = NeuronExamples.concat(variant.name, parts)
            ex.info["stored_labels"] = np.concatenate([p.info["stored_labels"] for p in parts])
            if "paths" in parts[0].info:  # gated: the path each planted neuron reads its features through
                ex.info["paths"] = np.concatenate([p.info["paths"] for p in parts])
            out.append(dataset_result("planted", variant.name, selection, ex, cfg))
            bar.update(1)
    return out


def _toy_datasets(cfg: BenchConfig, bar) -> list[dict]:
    from neuron_embeddings.groundtruth.toy import (
        ToyConfig,
        cached_toy_model,
        toy_dataset,
        toy_examples,
    )

    out = []
    for name, over in cfg.toy_variants.items():
        per_selection: dict[str, list[NeuronExamples]] = {s: [] for s in cfg.selections}
        losses = []
        for seed in cfg.toy_seeds:
            bar.set_postfix_str(f"toy {name} seed {seed}")
            model = cached_toy_model(ToyConfig(seed=seed, **over))
            losses.append(model.final_loss)
            data = toy_dataset(model, cfg.toy_eval, seed=10_000 + seed)
            for selection in cfg.selections:
                band = None if selection == "top" else float(selection.split(":")[1])
                per_selection[selection].append(toy_examples(model, data, cfg.k, band, seed, name))
            bar.update(1)
        for selection, parts in per_selection.items():
            bar.set_postfix_str(f"toy {name} {selection}")
            result = dataset_result("toy", name, selection, NeuronExamples.concat(name, parts), cfg)
            result["toy_config"] = ToyConfig(**over).to_dict()
            result["final_losses"] = losses
            out.append(result)
            bar.update(1)
    return out


def _sae_results(cfg: BenchConfig, bar) -> dict | None:
    """SAEs on the toy model (standard vs L_N); see ``groundtruth.sae_bench``."""
    if not cfg.sae:
        return None
    try:
        from neuron_embeddings.groundtruth.sae_bench import sae_benchmark
    except ImportError as e:  # the SAE training module is not available
        bar.update(_n_steps(BenchConfig("", [], [], {}, [], sae=cfg.sae)))
        return {"skipped": f"SAE training unavailable: {e}"}

    def tick(name: str) -> None:
        bar.set_postfix_str(f"SAE {name}")
        bar.update(1)

    return sae_benchmark(cfg.sae, tick)

