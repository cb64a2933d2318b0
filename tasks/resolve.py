"""From user options to validated settings: the checks that need the model or the store."""
from __future__ import annotations

from pathlib import Path

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.hub import check_sources
from neuron_embeddings.core.models import (
    LoadedModel,
    default_dtype,
    default_prepend_bos,
    load_model,
    special_token_ids,
)
from neuron_embeddings.core.settings import RunSettings, parse_layers
from neuron_embeddings.core.units import check_sae_fits, load_sae_cached
from neuron_embeddings.storage.store import Store, check_settings, check_writable


def resolve_run(out: str, model: str, dataset: str, layers: str | None, device: str,
                scan_blocks: int | None, workers: int, sae: str | None = None, prepend_bos: bool | None = None,
                exclude_special_tokens: bool = True, dtype: str | None = None,
                **options) -> tuple[RunSettings, LoadedModel]:
    """Load the model (cached per process), validate every option against it and against an
    existing store at `out`. Raises UserError with a one-line message on any mistake.
    With `sae` (an SAE directory) the store's units are that SAE's features, on its hook's layer.
    `prepend_bos` None: on for causal models whose tokenizer has a BOS token; `exclude_special_tokens`:
    the tokenizer's special tokens are never an example's max token; `dtype` None: the store's when
    resuming, else the device's default (core.models.default_dtype)."""
    # the checks that need neither model nor store come first, so they fail fast
    RunSettings(model=model, dataset=dataset, layers=(0,), scan_blocks=scan_blocks or 1, **options,
                **({"dtype": dtype} if dtype is not None else {}))
    check_sources(model, dataset)
    weights = load_sae_cached(sae) if sae is not None else None
    store = Store(out)
    existing = store.settings() if store.exists() else None
    if dtype is None:
        dtype = existing.dtype if existing else default_dtype(device)
    lm = load_model(model, device, dtype)
    layer_list = parse_layers(layers, lm.n_layers)
    if weights is not None:
        check_sae_fits(weights, lm.bridge)
        if layers is not None and layer_list != [weights.layer]:
            raise UserError(f"--layers {layers}: the SAE reads layer {weights.layer} ({weights.hook_name}); "
                            "leave --layers out when evaluating an SAE")
        layer_list = [weights.layer]
        sae = str(Path(sae).expanduser().resolve())
    if scan_blocks is None:
        scan_blocks = existing.scan_blocks if existing else max(1, min(workers, options.get("n_sequences", 1)))
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(lm)
    if prepend_bos and getattr(lm.tokenizer, "bos_token_id", None) is None:
        raise UserError(f"--prepend-bos: the tokenizer of {model} has no BOS token; use --no-prepend-bos")
    settings = RunSettings(model=model, dataset=dataset, layers=tuple(layer_list), scan_blocks=scan_blocks, sae=sae,
                           prepend_bos=bool(prepend_bos),
                           excluded_token_ids=special_token_ids(lm) if exclude_special_tokens else (), dtype=dtype,
                           **options)
    if settings.ctx_len > lm.n_ctx:
        raise UserError(f"--ctx-len {settings.ctx_len}: the model takes at most {lm.n_ctx} tokens; lower --ctx-len")
    if store.exists():
        check_settings(store, settings)
    else:
        check_writable(out)
    return settings, lm
