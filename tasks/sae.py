"""SAE training stages: cache one hook's activations, train an SAE on them, measure it.

Pure maths lives in neuron_embeddings/core/sae.py and the cache layout in storage/activations.py; this
module runs the model, wires them together, writes `SAE_DIR/{cfg.json, sae_weights.safetensors,
metrics.json}` and offers thin Prefect task wrappers. Tasks return small records (paths, figures).

An SAE directory is complete when `metrics.json` exists (written last). Training again into a
complete directory made with the same settings returns its metrics without retraining; with other
settings it is refused, so nothing a user trained is overwritten by mistake.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.models import HOOK_ACTIVATION, HOOK_INPUT, HOOK_PRE, capture, is_causal_lm  # noqa: F401
from neuron_embeddings.core.sae import SAETrainSettings

log = logging.getLogger(__name__)

HOOKS = {
    "post": HOOK_ACTIVATION,
    "pre": HOOK_PRE,
    "in": HOOK_INPUT,
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
METRICS_FILENAME = "metrics.json"
EVAL_FRACTION = 0.1  # share of the cached sequences held out for the metrics


def hook_name(hook: str, layer: int) -> str:
    """`--hook` (post, pre, in, resid_pre, resid_mid, resid_post, mlp_out) -> a TransformerLens hook name."""
    if hook not in HOOKS:
        raise UserError(f"--hook {hook!r}: use one of {', '.join(HOOKS)}")
    return HOOKS[hook].format(layer=layer)


def cache_key(model: str, dataset: str, hook: str, n_sequences: int, ctx_len: int, dtype: str) -> dict:
    return {"model": model, "dataset": dataset, "hook_name": hook, "n_sequences": n_sequences,
            "ctx_len": ctx_len, "dtype": dtype}


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=True, mininterval=0.5)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer} is out of range, the model has {n_layers} layers (0-{n_layers - 1})")


def model_hook(lm, hook: str, layer: int, ctx_len: int) -> str:
    """The hook name of `--hook` at `--layer`, checked against the loaded model (and --ctx-len)."""
    check_layer(layer, lm.n_layers)
    name = hook_name(hook, layer)
    if name not in lm.bridge.hook_dict:
        raise UserError(f"--hook {hook}: the model has no hook {name!r}")
    if ctx_len > lm.n_ctx:
        raise UserError(f"--ctx-len {ctx_len}: the model's context is {lm.n_ctx} tokens; use at most that")
    return name


def check_sae_train(settings: SAETrainSettings, d_in: int, n_sequences: int, ctx_len: int, dtype: str,
                    cache_dir: str, device: str) -> None:
    """Refuse, before anything is cached, a training that cannot fit: topk beyond the features, the
    SAE's training memory, the packed tokens and the activation cache's disk."""
    from neuron_embeddings.core.resources import check_disk, check_memory

    settings.check_fits(d_in)
    check_memory(n_sequences * ctx_len * 4, f"--n-sequences {n_sequences} x --ctx-len {ctx_len} tokens",
                 "lower --n-sequences or --ctx-len")
    d_sae = settings.d_sae(d_in)
    check_memory(settings.train_nbytes(d_in), f"training an SAE of {d_sae} features on {d_in} inputs "
                 f"(--expansion {settings.expansion:g}, --batch-size {settings.batch_size})",
                 "lower --expansion or --batch-size", device)
    if (Path(cache_dir) / "zarr.json").exists():  # a cache there already (reused, or replaced in place)
        return
    check_disk(n_sequences * ctx_len * (d_in * (2 if dtype == "float16" else 4) + 4), cache_dir,
               "the activation cache", "lower --n-sequences or --ctx-len, use --activation-dtype float16, "
               "or put --cache on a bigger disk")


def check_before_caching(model: str, layer: int, hook: str, trained: list[SAETrainSettings], n_sequences: int,
                         ctx_len: int, dtype: str, cache_dir: str, device: str) -> None:
    """The checks of an SAE training that need no model weights (its sizes from the model's config
    when at hand), before any directory or cache is made."""
    from neuron_embeddings.core.models import config_dims, resolve_device
    from neuron_embeddings.storage.activations import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--activation-dtype {dtype!r}: use float16 or float32")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise UserError(f"--cache {cache_dir}: exists and is not a directory; give a directory for the activation cache")
    split_rows(n_sequences, ctx_len)  # at least 2 sequences
    if ctx_len < 1:
        raise UserError(f"--ctx-len {ctx_len}: need at least 1 token per sequence")
    dims = config_dims(model)
    if dims is not None:
        check_layer(layer, dims["n_layers"])
        hook_name(hook, layer)
        d_in = dims["d_mlp"] if hook in ("post", "pre") else dims["d_model"]
        for settings in trained:
            check_sae_train(settings, d_in, n_sequences, ctx_len, dtype, cache_dir, resolve_device(device))


def cache_activations(cache_dir: str, model: str, dataset: str, layer: int, hook: str = "post",
                      n_sequences: int = 1024, ctx_len: int = 128, batch_size: int = 16, device: str = "auto",
                      dtype: str = "float16", progress: bool = True) -> dict:
    """Activations of `hook` at `layer` over `n_sequences` packed rows of `dataset`, into the cache
    at `cache_dir` (reused when it already holds exactly these). Returns a small record."""
    from neuron_embeddings.core.datasets import iter_documents, pack_tokens
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.storage.activations import CacheWriter, existing_cache

    lm = load_model(model, device)
    name = model_hook(lm, hook, layer, ctx_len)
    key = cache_key(model, dataset, name, n_sequences, ctx_len, dtype)
    found = existing_cache(cache_dir, key)
    if found is not None:
        return {"cache": str(cache_dir), "rows": found.n_rows, "d_in": found.d_in, "reused": True}
    tokens = pack_tokens(iter_documents(dataset), lm.tokenizer, n_sequences, ctx_len, dataset_name=dataset)
    writer = None
    bar = _bar(n_sequences, "cache", "seq") if progress else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n_sequences, batch_size):
            ids = torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)).to(lm.device)
            acts = capture(lm.bridge, ids, [name])[name]
            rows = acts.reshape(-1, acts.shape[-1]).float().cpu().numpy()
            if writer is None:
                writer = CacheWriter(cache_dir, key, n_sequences, ctx_len, rows.shape[1], dtype)
                writer.write_tokens(tokens)
            writer.append(rows)
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    cache = writer.finish()
    return {"cache": str(cache_dir), "rows": cache.n_rows, "d_in": cache.d_in, "reused": False,
            "seconds": round(time.perf_counter() - t0, 2)}


def split_rows(n_sequences: int, ctx_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(train rows, held-out rows): the last EVAL_FRACTION of the sequences (at least one) are held out."""
    if n_sequences < 2:
        raise UserError(f"--n-sequences {n_sequences}: need at least 2 sequences (one is held out for the metrics)")
    n_eval = max(1, round(EVAL_FRACTION * n_sequences))
    cut = (n_sequences - n_eval) * ctx_len
    return (0, cut), (cut, n_sequences * ctx_len)


def lm_loss_metrics(bridge, weights, hook: str, tokens_ST: np.ndarray, batch_size: int = 8) -> dict:
    """Mean next-token loss on `tokens_ST`: clean, with the hook's activations replaced by the SAE's
    reconstruction, and zero-ablated (for scale). `loss_recovered` = (zero - sae) / (zero - clean)."""
    dev = next(bridge.parameters()).device
    W = {k: getattr(weights, k).to(dev) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    from neuron_embeddings.core.sae_io import SAEWeights

    sae = SAEWeights(**W, cfg=weights.cfg, threshold=None if weights.threshold is None else weights.threshold.to(dev))

    def splice(t, hook):
        return sae.decode(sae.encode(t.reshape(-1, t.shape[-1]).float())).reshape(t.shape).to(t.dtype)

    def zero(t, hook):
        return torch.zeros_like(t)

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n = 0
    with torch.inference_mode():
        for start in range(0, len(tokens_ST), batch_size):
            ids = torch.from_numpy(tokens_ST[start:start + batch_size].astype(np.int64)).to(dev)
            w = ids.shape[0]
            totals["clean"] += w * float(bridge(ids, return_type="loss"))
            totals["sae"] += w * float(bridge.run_with_hooks(ids, return_type="loss", fwd_hooks=[(hook, splice)]))
            totals["zero"] += w * float(bridge.run_with_hooks(ids, return_type="loss", fwd_hooks=[(hook, zero)]))
            n += w
    clean, sae_l, zero_l = (totals[k] / n for k in ("clean", "sae", "zero"))
    return {"lm_loss_clean": clean, "lm_loss_sae": sae_l, "lm_loss_zero": zero_l, "delta_lm_loss": sae_l - clean,
            "loss_recovered": (zero_l - sae_l) / (zero_l - clean) if zero_l != clean else float("nan")}


def _train_record(settings, cache_attrs: dict) -> dict:
    """What identifies a trained SAE: its training settings and the data it saw."""
    return {"settings": settings.to_dict(), "data": cache_attrs["key"]}


def _finished(sae_dir: Path, record: dict) -> dict | None:
    """The metrics of a complete SAE directory trained with `record`, None if there is none there;
    a complete one trained otherwise is refused."""
    cfg_p, met_p = sae_dir / "cfg.json", sae_dir / METRICS_FILENAME
    if not met_p.exists():
        return None
    stored = json.loads(cfg_p.read_text()).get("neuron_embeddings_training") if cfg_p.exists() else None
    if stored != record:
        raise UserError(f"--out {sae_dir}: holds an SAE trained with other settings; choose another --out or delete it")
    return json.loads(met_p.read_text())


def check_sae_out(sae_dir: str) -> None:
    """An --out that is a file, or a directory holding something other than an SAE, is refused."""
    p = Path(sae_dir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {sae_dir}: exists and is not a directory")
    if p.is_dir():
        ours = {"cfg.json", "sae_weights.safetensors", METRICS_FILENAME, "activations.zarr", "cfg.json.tmp",
                "sae_weights.safetensors.tmp"}
        other = [c.name for c in p.iterdir() if c.name not in ours]
        if other:
            raise UserError(f"--out {sae_dir}: the directory holds other files ({', '.join(sorted(other)[:3])}); "
                            "choose an empty or new directory")


def train_and_save(sae_dir: str, cache_dir: str, settings, device: str = "auto", model: str | None = None,
                   dataset: str | None = None, layer: int | None = None, progress: bool = True,
                   lm_batch_size: int = 8) -> dict:
    """Train an SAE on the cache, save it in SAELens's layout and write metrics.json. Returns the metrics."""
    from neuron_embeddings.core.models import load_model, resolve_device
    from neuron_embeddings.core.sae import cpu_threads_for, reconstruction_metrics, train_sae
    from neuron_embeddings.core.sae_io import load_sae, save_sae
    from neuron_embeddings.storage.activations import ActivationCache, ShuffledBatches

    out = Path(sae_dir)
    check_sae_out(sae_dir)
    cache = ActivationCache(cache_dir)
    key = cache.attrs["key"]
    record = _train_record(settings, cache.attrs)
    done = _finished(out, record)
    if done is not None:
        return done
    dev = resolve_device(device)
    train_rows, eval_rows = split_rows(key["n_sequences"], key["ctx_len"])
    stream = ShuffledBatches(cache, settings.batch_size, rows=train_rows, seed=settings.seed).stream()
    bar = _bar(settings.steps, "train", "step") if progress else None

    def report(step: int, rec: dict) -> None:
        if bar is not None:
            bar.update(1)
            if rec:
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k in ("mse", "l0", "l_n")}, refresh=False)

    t0 = time.perf_counter()
    sae, state = train_sae(stream, cache.d_in, settings, device=dev, progress=report)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    layer = layer if layer is not None else _layer_of(key["hook_name"])
    cfg = {"model_name": model or key["model"], "hook_name": key["hook_name"], "hook_layer": layer,
           "context_size": key["ctx_len"], "dataset_path": dataset or key["dataset"], "architecture": settings.architecture,
           "prepend_bos": False, "neuron_embeddings_training": record, "neuron_embeddings_scale": state.scale}
    if settings.architecture == "topk":
        cfg["k"] = settings.topk
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILENAME).unlink(missing_ok=True)
    save_sae(out, sae.to_weights(state.scale, cfg))
    weights = load_sae(out)  # measure what was written
    evaluate = ShuffledBatches(cache, 4096, rows=eval_rows, device=dev)
    with cpu_threads_for(4096 * weights.d_in * weights.d_sae, dev):
        metrics = reconstruction_metrics(weights, evaluate.sequential, device=dev)
    metrics.update({"architecture": settings.architecture, "hook_name": key["hook_name"], "layer": layer,
                    "model": key["model"], "dataset": key["dataset"], "eval_sequences": (eval_rows[1] - eval_rows[0]) // key["ctx_len"],
                    "train_steps": settings.steps, "train_seconds": round(seconds, 2),
                    "train_activations_per_s": round(settings.steps * settings.batch_size / seconds, 1),
                    "l_n_train_last": state.last_l_n, "resampled": state.resampled,
                    "final_train": state.history[-1] if state.history else None,
                    "l1": settings.l1, "ln_coef": settings.ln_coef})
    lm = load_model(key["model"], dev)
    if is_causal_lm(lm.bridge):
        tokens = cache.tokens()[eval_rows[0] // key["ctx_len"]:]
        metrics.update(lm_loss_metrics(lm.bridge, weights, key["hook_name"], tokens, lm_batch_size))
    else:
        metrics.update({"lm_loss_clean": None, "lm_loss_sae": None, "lm_loss_zero": None, "delta_lm_loss": None,
                        "loss_recovered": None, "lm_loss_note": "not a causal language model: no next-token loss"})
    tmp = out / (METRICS_FILENAME + ".tmp")
    tmp.write_text(json.dumps(_jsonable(metrics), indent=2))
    tmp.replace(out / METRICS_FILENAME)
    return metrics


def _layer_of(hook: str) -> int:
    import re

    m = re.search(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else 0


def _jsonable(d: dict) -> dict:
    """NaN -> None so metrics.json is strict JSON."""
    def fix(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return fix(d)


def sae_train(out: str, model: str, dataset: str, layer: int, settings, hook: str = "post",
              n_sequences: int = 1024, ctx_len: int = 128, cache: str | None = None, device: str = "auto",
              activation_dtype: str = "float16", forward_batch_size: int = 16, progress: bool = True) -> dict:
    """`neuron-embeddings sae train`: cache (or reuse) the activations, train, save, measure."""
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.core.units import hook_width

    check_sae_out(out)
    cache_dir = cache or str(Path(out) / "activations.zarr")
    check_before_caching(model, layer, hook, [settings], n_sequences, ctx_len, activation_dtype, cache_dir, device)
    lm = load_model(model, device)
    d_in = hook_width(lm.bridge, model_hook(lm, hook, layer, ctx_len))
    check_sae_train(settings, d_in, n_sequences, ctx_len, activation_dtype, cache_dir, lm.device)
    cache_activations(cache_dir, model, dataset, layer, hook, n_sequences, ctx_len, forward_batch_size, device,
                      activation_dtype, progress)
    return train_and_save(out, cache_dir, settings, device, model=model, dataset=dataset, layer=layer, progress=progress)


# --- Prefect tasks ----------------------------------------------------------------------------

@task(name="sae-cache-activations", cache_policy=NO_CACHE)
def cache_activations_task(cache_dir: str, model: str, dataset: str, layer: int, hook: str, n_sequences: int,
                           ctx_len: int, batch_size: int, device: str, dtype: str) -> dict:
    return cache_activations(cache_dir, model, dataset, layer, hook, n_sequences, ctx_len, batch_size, device,
                             dtype, progress=False)


@task(name="sae-train", task_run_name="sae-train-{sae_dir}", cache_policy=NO_CACHE)
def train_sae_task(sae_dir: str, cache_dir: str, settings: dict, device: str) -> dict:
    return train_and_save(sae_dir, cache_dir, SAETrainSettings(**settings), device, progress=False)
