"""SAEs on the toy model of superposition: does the neuron-embedding loss L_N make an SAE's
features match the true features better, and at what reconstruction cost?

The SAEs decompose the toy model's MLP input x = f @ W_FD (d_in = d_model), where the true feature
directions are known exactly: the rows of W_FD. Both SAEs use the project's trainer
(``neuron_embeddings.core.sae.train_sae``) with the same settings and seed, except L_N's coefficient.
Measures: the mean max cosine similarity (MMCS) between the true directions and the SAE's decoder
rows (for each true feature, the best-matching decoder row; Sharkey et al. 2022), the fraction of
true features with a decoder row at cosine > 0.9, and ``reconstruction_metrics`` on held-out x.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from neuron_embeddings.groundtruth.toy import (
    ToyConfig,
    ToyModel,
    cached_toy_model,
    sample_features,
)

RECOVERED_COS = 0.9
REPRESENTED_NORM = 0.5


def mmcs(true_FD: np.ndarray, dec_SD: np.ndarray) -> tuple[float, float]:
    """(mean over true features of the max cosine with any decoder row, share with max cos > 0.9)."""
    t = true_FD / np.linalg.norm(true_FD, axis=1, keepdims=True).clip(1e-12)
    d = dec_SD / np.linalg.norm(dec_SD, axis=1, keepdims=True).clip(1e-12)
    best_F = (t @ d.T).max(axis=1)
    return float(best_F.mean()), float((best_F > RECOVERED_COS).mean())


def represented(model: ToyModel) -> np.ndarray:
    """[F] bool: features the toy model embeds in x (|W_i| >= 0.5; the others it drops, |W_i| ~ 0)."""
    return np.linalg.norm(model.W_FD, axis=1) >= REPRESENTED_NORM


def x_batches(model: ToyModel, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, d_model] of the toy model's MLP inputs."""
    rng = np.random.default_rng(seed)
    while True:
        yield torch.from_numpy(model.x(sample_features(model.config, batch_size, rng, model.scale_F), rng))


def held_out(model: ToyModel, n: int, seed: int, batch_size: int = 8192) -> Callable[[], Iterator[torch.Tensor]]:
    """A function yielding the same held-out batches on every call."""
    rng = np.random.default_rng(seed)
    x = model.x(sample_features(model.config, n, rng, model.scale_F), rng)
    return lambda: (torch.from_numpy(x[i:i + batch_size]) for i in range(0, n, batch_size))


def train_and_score(model: ToyModel, settings, seed: int) -> dict:
    """Train one SAE on the toy model's x and score it against the true directions."""
    from neuron_embeddings.core.sae import reconstruction_metrics, train_sae

    sae, state = train_sae(x_batches(model, settings.batch_size, seed), model.config.d_model, settings)
    weights = sae.to_weights(state.scale, {"architecture": settings.architecture})
    rep_F = represented(model)
    m, rec = mmcs(model.W_FD[rep_F], weights.W_dec.numpy())
    m_all, _ = mmcs(model.W_FD, weights.W_dec.numpy())
    metrics = reconstruction_metrics(weights, held_out(model, 50_000, seed + 1))
    return {"mmcs": m, "recovered": rec, "mmcs_all_features": m_all, "n_represented": int(rep_F.sum()),
            **{k: metrics[k] for k in ("explained_variance", "mse", "l0", "dead_fraction", "l_n")}}


def sae_benchmark(cfg: dict, tick: Callable[[str], None] = lambda name: None) -> dict:
    """A standard SAE (L_N coefficient 0) and L_N SAEs (``cfg['ln_coefs']``) on the base toy model, one
    set per seed in ``cfg['seeds']``; otherwise the same settings and seed."""
    from neuron_embeddings.core.sae import SAETrainSettings

    steps = int(cfg.get("steps", 3000))
    common = dict(expansion=cfg.get("expansion", 4.0), l1=cfg.get("l1", 1.0), steps=steps,
                  batch_size=cfg.get("batch_size", 1024), lr=cfg.get("lr", 1e-3))
    ln_start = int(cfg.get("ln_start_frac", 0.25) * steps)
    variants = {("standard" if c == 0 else f"L_N x {c:g}"): dict(ln_coef=c, ln_start=ln_start if c else 0)
                for c in cfg.get("ln_coefs", (0.0, 1e-3))}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in cfg.get("seeds", [0]):
        toy = cached_toy_model(ToyConfig(seed=seed, **cfg.get("toy", {})))
        for name, over in variants.items():
            runs[name].append(train_and_score(toy, SAETrainSettings(seed=seed, **common, **over), seed))
            tick(f"{name} seed {seed}")
    rows = []
    for name, rs in runs.items():
        agg = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        rows.append({"name": name, "n_runs": len(rs), **agg, "mmcs_std": float(np.std([r["mmcs"] for r in rs]))})
    desc = (f"SAEs with {common['expansion']:g}x as many features as x has dimensions, trained on the toy model's "
            f"MLP input x with the project's trainer (`neuron_embeddings.core.sae.train_sae`; {steps} steps of "
            f"{common['batch_size']}, L1 {common['l1']:g} on inputs scaled to E|x|^2 = d_in, lr {common['lr']:g}). "
            f"The L_N SAEs add c x L_N (summed over the batch's active input-feature pairs, EMA lookup) from step "
            f"{ln_start}; everything else, seed included, is the same. MMCS: for each true feature direction the "
            f"toy model represents (|W_i| >= {REPRESENTED_NORM}), the best cosine with a decoder row, averaged; "
            f"recovered: the share of those with a decoder row at cosine > {RECOVERED_COS}. Reconstruction on "
            f"50,000 held-out inputs. Means over seeds {list(cfg.get('seeds', [0]))}.")
    return {"rows": rows, "runs": runs, "settings": {**common, "ln_start": ln_start}, "description": desc}
