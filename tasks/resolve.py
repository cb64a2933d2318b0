"""From user options to validated settings: the checks that need the model or the store."""
from __future__ import annotations

from pathlib import Path

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.hub import check_sources
from neuron_embeddings.core.models import (
    LoadedModel,
    config_dims,
    default_dtype,
    default_prepend_bos,
    is_gated,
    load_model,
    resolve_device,
    special_token_ids,
)
from neuron_embeddings.core.resources import check_disk, check_memory
from neuron_embeddings.core.scan import SlotTable, Spectrum
from neuron_embeddings.core.settings import HIST_BINS, RunSettings, layer_ranges, parse_layers
from neuron_embeddings.core.units import check_sae_fits, load_sae_cached
from neuron_embeddings.storage import schema
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
    early = RunSettings(model=model, dataset=dataset, layers=(0,), scan_blocks=scan_blocks or 1, **options,
                        **({"dtype": dtype} if dtype is not None else {}))
    layer_ranges(layers)  # syntax only, nothing expanded
    check_sources(model, dataset)
    weights = load_sae_cached(sae) if sae is not None else None
    store = Store(out)
    existing = store.settings() if store.exists() else None
    blocks = scan_blocks or (existing.scan_blocks if existing else max(1, min(workers, early.n_sequences)))
    dims = config_dims(model)  # the sizes checks before the model loads, when its config is at hand
    if dims is not None and dims.get("n_ctx") and early.ctx_len > dims["n_ctx"]:
        raise UserError(f"--ctx-len {early.ctx_len}: the model takes at most {dims['n_ctx']} tokens; lower --ctx-len")
    if dims is not None:
        n_rows = 1 if weights is not None else len(parse_layers(layers, dims["n_layers"]))
        units = (weights.d_sae, weights.d_in) if weights is not None else (dims["d_mlp"], dims["d_model"])
        check_resources(out, early, n_rows, *units, units[1], 0, blocks, workers, resolve_device(device),
                        existing is None)
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
    gated = weights is None and is_gated(lm)
    units = (weights.d_sae, weights.d_in) if weights is not None else (lm.d_mlp, lm.d_model)
    check_resources(out, settings, len(layer_list), *units, units[1] * (2 if gated else 1), len(lm.tokenizer),
                    scan_blocks, workers, lm.device, not store.exists(), gated)
    return settings, lm


def check_resources(out: str, s: RunSettings, n_rows: int, n_units: int, d_input: int, d_embed: int, d_vocab: int,
                    scan_blocks: int, workers: int, device: str, new_store: bool, gated: bool = False) -> None:
    """Refuse a run whose tokens, scan tables (the slot pool of every row, in each local worker that
    scans a block at once) or store would not fit in the memory and disk at hand."""
    check_memory(s.n_sequences * s.ctx_len * 4, f"--n-sequences {s.n_sequences} x --ctx-len {s.ctx_len} tokens",
                 "lower --n-sequences or --ctx-len")
    itemsize = 2 if s.embedding_dtype == "float16" else 4
    parallel = max(1, min(workers, scan_blocks))
    tables = parallel * n_rows * (SlotTable.nbytes(n_units, s.k, d_input, itemsize, schema.WINDOW)
                                  + Spectrum.nbytes(len(s.strata), n_units, s.strata_k, d_input, itemsize, schema.WINDOW))
    each = f", in {parallel} workers at once" if parallel > 1 else ""
    check_memory(tables, f"the scan's top-k tables ({n_rows} layers x {n_units} units x --k {s.k} examples x "
                 f"{d_input} inputs{each})", "lower --k, select fewer --layers, or use fewer --workers", device)
    if new_store:
        sizes = schema.sizes(n_rows, n_units, d_input, d_embed, s.k, s.n_sequences, s.ctx_len, d_vocab, scan_blocks,
                             len(s.strata), s.strata_k, HIST_BINS)
        feats = {"logits"} | ({"gated"} if gated else set()) | ({"strata"} if s.strata else set())
        check_disk(schema.nbytes(sizes, s.embedding_dtype, feats), out, "the store",
                   "choose an --out on a bigger disk, or lower --k, --n-sequences or the number of --layers")
