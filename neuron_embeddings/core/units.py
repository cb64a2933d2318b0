"""What a store's units are: a model's MLP neurons (the default) or the features of an SAE.

For MLP neurons the scan hooks `mlp.hook_in` (x) and `mlp.hook_post` (the activation) and the
weights are the MLP's `W_in`, `b_in`. For an SAE attached at hook `h` the scan hooks `h` only and
computes, per token, x = the encoder's input (h - b_dec where the SAE subtracts it) and the feature
activations f; the weights are `W_enc`, `b_enc`. Either way `sum(x ⊙ W[:, j]) + b[j]` is unit j's
pre-activation, which is what the embedding e = x ⊙ W[:, j] relies on.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from neuron_embeddings.core.errors import UserError

_SAE_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


def load_sae_cached(path: str):
    """The SAE at `path` (sae_io.SAEWeights), loaded at most once per process."""
    from neuron_embeddings.core.sae_io import load_sae

    key = str(Path(path).expanduser().resolve())
    with _LOCK:
        if key not in _SAE_CACHE:
            if not Path(key).is_dir():
                raise UserError(f"--sae {path}: no such directory; give an SAE directory "
                                "(cfg.json + sae_weights.safetensors, SAELens layout)")
            _SAE_CACHE[key] = load_sae(key)
        return _SAE_CACHE[key]


def hook_template(hook_name: str) -> str:
    """`blocks.3.mlp.hook_post` -> `blocks.{layer}.mlp.hook_post` (the store's hook attributes)."""
    return re.sub(r"(^|\.)blocks\.\d+\.", r"\1blocks.{layer}.", hook_name, count=1)


class _Stop(Exception):
    pass


def hook_width(bridge, hook_name: str) -> int:
    """The last dimension of the activations at `hook_name`, from a one-token forward; a one-line
    error when the model has no such hook."""
    if hook_name not in bridge.hook_dict:
        raise UserError(f"the SAE reads hook {hook_name!r}, which this model does not have; "
                        "evaluate it with the model it was trained on")
    seen = {}

    def grab(t, hook):
        seen["d"] = int(t.shape[-1])
        raise _Stop

    ids = torch.zeros((1, 1), dtype=torch.long, device=next(bridge.parameters()).device)
    with torch.inference_mode():
        try:
            bridge.run_with_hooks(ids, fwd_hooks=[(hook_name, grab)])
        except _Stop:
            pass
    return seen["d"]


def check_sae_fits(sae, bridge) -> None:
    d = hook_width(bridge, sae.hook_name)
    if d != sae.d_in:
        raise UserError(f"the SAE expects d_in={sae.d_in} at {sae.hook_name}, but the model gives {d} there; "
                        "evaluate it with the model it was trained on")


def sae_model_info(sae, sae_path: str) -> dict:
    """Store attributes that differ for an SAE store (see resolve.model_info)."""
    return {"unit": "sae-feature", "d_model": sae.d_in, "d_mlp": sae.d_sae, "weights": "sae-encoder",
            "hook_input": hook_template(sae.hook_name), "hook_pre": "sae: encoder_input(x) @ W_enc + b_enc",
            "hook_activation": f"sae: {sae.architecture} features of " + hook_template(sae.hook_name),
            "sae_path": str(sae_path), "sae_architecture": sae.architecture,
            "sae_apply_b_dec_to_input": sae.apply_b_dec_to_input}


def sae_weights_for_store(sae) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [1, d_in, d_sae], b [1, d_sae]) float32: the store's `weights/W_in`, `weights/b_in`."""
    return sae.W_enc.detach().float().cpu()[None], sae.b_enc.detach().float().cpu()[None]
