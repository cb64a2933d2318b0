"""The SAE flow: cache -> train a standard SAE and an L_N SAE -> evaluate both and the layer's
neurons with the neuron-embedding pipeline -> compare (markdown table, PNG plot, Prefect artifacts).

Orchestration only; the work lives in tasks/sae.py (cache, train), the pipeline flow
(flows/run.py) and tasks/sae_report.py (figures). Everything lands under `out`:

    out/activations.zarr          the cached activations (shared by both SAEs)
    out/sae-standard/, sae-ln/    cfg.json, sae_weights.safetensors, metrics.json (SAELens layout)
                                  (several L_N coefficients: sae-ln-<coef>/ each)
    out/neurons.zarr              the layer's MLP neurons   (contract store, unit mlp-neuron)
    out/features-standard.zarr    the standard SAE's features (unit sae-feature)
    out/features-ln.zarr          the L_N SAE's features (features-ln-<coef>.zarr each)
    out/report.md, comparison.png, comparison.json

Each step resumes: a complete cache, SAE directory or store made with the same settings is reused.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from neuron_embeddings.core.sae import SAETrainSettings
from neuron_embeddings.core.settings import DEMO, default
from neuron_embeddings.flows.run import neuron_embeddings_run
from neuron_embeddings.tasks.sae import cache_activations_task, check_before_caching, train_sae_task
from neuron_embeddings.tasks.sae_report import compare_task

SAE = SAETrainSettings()  # the SAE training defaults


def ln_names(ln_coef: float | list[float]) -> dict[str, float]:
    """{unit-kind name: coefficient}: `sae-ln` for one coefficient, `sae-ln-<coef>` for several."""
    coefs = [float(ln_coef)] if isinstance(ln_coef, (int, float)) else [float(c) for c in ln_coef]
    if len(coefs) == 1:
        return {"sae-ln": coefs[0]}
    return {f"sae-ln-{c:g}": c for c in coefs}


@flow(name="neuron-embeddings-sae", log_prints=True)
def sae_flow(
    out: str,
    model: str = DEMO["model"],
    dataset: str = DEMO["dataset"],
    layer: int = 3,
    hook: str = "post",
    n_sequences: int = 768,
    ctx_len: int = 64,
    architecture: str = SAE.architecture,
    topk: int | None = SAE.topk,
    expansion: float = SAE.expansion,
    l1: float = SAE.l1,
    ln_coef: float | list[float] = 1e-3,
    ln_start: int = SAE.ln_start,
    ln_momentum: float = SAE.ln_momentum,
    ln_update: str = SAE.ln_update,
    steps: int = SAE.steps,
    batch_size: int = SAE.batch_size,
    lr: float = SAE.lr,
    seed: int = SAE.seed,
    k: int = default("k"),
    selection: str = default("selection"),
    linkage: str = default("linkage"),
    threshold: float = default("threshold"),
    shard_size: int = default("shard_size"),
    activation_dtype: str = "float16",
    strata: str | None = default("strata"),
    strata_k: int = default("strata_k"),
    device: str = default("device"),
    workers: int = default("workers"),
) -> dict:
    """Are the SAE features more monosemantic than the layer's neurons, and does L_N help at the
    same reconstruction quality? The same SAE settings train every SAE; only `ln_coef` differs
    (a list of coefficients trains one L_N SAE per coefficient). `strata` (e.g. '0.75,0.5,0.25,0')
    evaluates every store across the activation spectrum too (see the pipeline flow)."""
    from neuron_embeddings.core.sae import SAETrainSettings

    base = dict(expansion=expansion, architecture=architecture, topk=topk, l1=l1, ln_start=ln_start,
                ln_momentum=ln_momentum, ln_update=ln_update, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    trained = {"sae-standard": SAETrainSettings(**base, ln_coef=0.0).to_dict()}  # validates before any work
    trained.update({name: SAETrainSettings(**base, ln_coef=c).to_dict() for name, c in ln_names(ln_coef).items()})
    root = Path(out)
    check_before_caching(model, layer, hook, [SAETrainSettings(**t) for t in trained.values()], n_sequences, ctx_len,
                         activation_dtype, str(root / "activations.zarr"), device)  # sizes, before any directory
    root.mkdir(parents=True, exist_ok=True)
    n_steps = 3 + 2 * len(trained)  # cache, trainings, evaluations (neurons + SAEs), report
    progress = create_progress_artifact(0.0, key="sae-flow-progress", description=f"SAE flow: steps done of {n_steps}")
    done = [0]

    def advance() -> None:
        done[0] += 1
        update_progress_artifact(progress, 100.0 * done[0] / n_steps)

    cache = str(root / "activations.zarr")
    cache_activations_task(cache, model, dataset, layer, hook, n_sequences, ctx_len, 16, device, activation_dtype)
    advance()
    sae_dirs = {name: str(root / name) for name in trained}
    for name, settings in trained.items():
        train_sae_task(sae_dirs[name], cache, settings, device)
        advance()
    run_opts = dict(model=model, dataset=dataset, n_sequences=n_sequences, ctx_len=ctx_len, k=k, selection=selection,
                    shard_size=shard_size, linkage=linkage, threshold=threshold, seed=seed, device=device,
                    workers=workers, strata=strata, strata_k=strata_k)
    stores = {"neurons": str(root / "neurons.zarr")}
    stores.update({name: str(root / f"features-{name[4:]}.zarr") for name in trained})
    neuron_embeddings_run.with_options(name="neurons")(out=stores["neurons"], layers=str(layer), **run_opts)
    advance()
    for name in trained:
        neuron_embeddings_run.with_options(name=f"features-{name}")(out=stores[name], sae=sae_dirs[name], **run_opts)
        advance()
    title = f"Layer {layer} of {model}: MLP neurons vs SAE features ({hook}, {architecture}, L_N coef {ln_coef})"
    rep = compare_task(str(root), stores, sae_dirs, title,
                       {"model": model, "dataset": dataset, "layer": layer, "hook": hook, "n_sequences": n_sequences,
                        "ctx_len": ctx_len, "k": k, "threshold": threshold, "sae": {**base, "ln_coef": ln_coef}})
    create_markdown_artifact(rep["markdown"], key="sae-comparison", description="neurons vs SAE features")
    advance()
    get_run_logger().info("%s", rep["table"])
    return {"rows": rep["rows"], "report": rep["report"], "plot": rep["plot"], "sae_dirs": sae_dirs, "stores": stores}
