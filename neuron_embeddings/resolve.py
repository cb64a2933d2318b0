"""From user options to validated settings: the checks that need the model or the store."""
from __future__ import annotations

from neuron_embeddings.errors import UserError
from neuron_embeddings.models import (HOOK_ACTIVATION, HOOK_INPUT, HOOK_PRE, LoadedModel, load_model,
                                      versions)
from neuron_embeddings.settings import RunSettings, parse_layers
from storage.store import Store, check_settings, check_writable


def resolve_run(out: str, model: str, dataset: str, layers: str | None, device: str,
                scan_blocks: int | None, workers: int, **options) -> tuple[RunSettings, LoadedModel]:
    """Load the model (cached per process), validate every option against it and against an
    existing store at `out`. Raises UserError with a one-line message on any mistake."""
    # the checks that need neither model nor store come first, so they fail fast
    RunSettings(model=model, dataset=dataset, layers=(0,), scan_blocks=scan_blocks or 1, **options)
    store = Store(out)
    existing = store.settings() if store.exists() else None
    lm = load_model(model, device)
    layer_list = parse_layers(layers, lm.n_layers)
    if scan_blocks is None:
        scan_blocks = existing.scan_blocks if existing else max(1, min(workers, options.get("n_sequences", 1)))
    settings = RunSettings(model=model, dataset=dataset, layers=tuple(layer_list),
                           scan_blocks=scan_blocks, **options)
    if settings.ctx_len > lm.n_ctx:
        raise UserError(f"--ctx-len {settings.ctx_len}: the model takes at most {lm.n_ctx} tokens; lower --ctx-len")
    if store.exists():
        check_settings(store, settings)
    else:
        check_writable(out)
    return settings, lm


def model_info(lm: LoadedModel, model: str) -> dict:
    return {"model": model, "d_model": lm.d_model, "d_mlp": lm.d_mlp, "weights": lm.weights,
            "hook_input": HOOK_INPUT, "hook_pre": HOOK_PRE, "hook_activation": HOOK_ACTIVATION,
            "model_n_layers": lm.n_layers, **versions()}
