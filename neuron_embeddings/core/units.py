"""Unit sources: where a store's units get their input x, their activation and their weights.

A unit is anything with an input vector x and input weights whose product sums to its
pre-activation. A `UnitSource` says which hooks feed a store row, how the captured tensors become
(activations, x), and the weights the embeddings multiply x by; the scan, the embed stage and the
explorer see a unit source, never a model family. Two today: MLP neurons and SAE features.

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
from neuron_embeddings.core.models import (HOOK_ACTIVATION, HOOK_INPUT, HOOK_PRE, HOOK_PRE_LINEAR, LoadedModel, capture,
                                          gate_weights, is_gated, mlp_weights, out_weights, versions)

_SAE_CACHE: dict[str, object] = {}
RESIDUAL_HOOK = re.compile(r"(^|\.)hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")  # hooks in d_model
MLP_POST_HOOK = re.compile(r"(^|\.)mlp\.hook_post$")
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


def hook_width(bridge, hook_name: str) -> int:
    """The last dimension of the activations at `hook_name`, from a one-token forward; a one-line
    error when the model has no such hook."""
    if hook_name not in bridge.hook_dict:
        raise UserError(f"the SAE reads hook {hook_name!r}, which this model does not have; "
                        "evaluate it with the model it was trained on")
    ids = torch.zeros((1, 1), dtype=torch.long, device=next(bridge.parameters()).device)
    with torch.inference_mode():
        return int(capture(bridge, ids, [hook_name])[hook_name].shape[-1])


def check_sae_fits(sae, bridge) -> None:
    d = hook_width(bridge, sae.hook_name)
    if d != sae.d_in:
        raise UserError(f"the SAE expects d_in={sae.d_in} at {sae.hook_name}, but the model gives {d} there; "
                        "evaluate it with the model it was trained on")


def sae_model_info(sae, sae_path: str) -> dict:
    """Store attributes that differ for an SAE store (see resolve.model_info)."""
    return {"unit": "sae-feature", "d_model": sae.d_in, "d_mlp": sae.d_sae, "d_embed": sae.d_in,
            "embedding": SAEFeatures.embedding, "gated": False, "weights": "sae-encoder",
            "hook_input": hook_template(sae.hook_name), "hook_pre": "sae: encoder_input(x) @ W_enc + b_enc",
            "hook_activation": f"sae: {sae.architecture} features of " + hook_template(sae.hook_name),
            "sae_path": str(sae_path), "sae_architecture": sae.architecture,
            "sae_apply_b_dec_to_input": sae.apply_b_dec_to_input}


def sae_weights_for_store(sae) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [1, d_in, d_sae], b [1, d_sae]) float32: the store's `weights/W_in`, `weights/b_in`."""
    return sae.W_enc.detach().float().cpu()[None], sae.b_enc.detach().float().cpu()[None]


# --- the interface ----------------------------------------------------------------------------

class UnitSource:
    """Where the units of one store come from. Subclasses set `kind` (the store's `unit` attribute)."""

    kind: str = ""
    embedding: str = "x*W_in"  # the embedding's layout: the weights x is multiplied by, "|" between halves
    n_units: int  # M: units per row
    d_input: int  # D: width of x

    @property
    def d_embed(self) -> int:
        """Width of a unit's embedding: x times each of its input weight matrices, concatenated."""
        return self.d_input * len(self.embedding.split("|"))

    def taps(self, layer: int, need_x: bool = True) -> tuple[str, ...]:
        """Hook names the scan captures for the row of `layer`, in forward order."""
        raise NotImplementedError

    def read(self, captured: dict[str, torch.Tensor], layer: int, need_x: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(activations [B, T, M], x [B, T, D] or None) from the row's captured tensors."""
        raise NotImplementedError

    def weights(self, layers: list[int]) -> dict[str, torch.Tensor]:
        """float32 input weights by name, in the order of `embedding`: "W_in" [rows, D, M] and "b_in"
        [rows, M] (sum(x * W_in[r, :, j]) + b_in[r, j] is unit j's pre-activation), and for gated
        units also "W_gate", "b_gate" (the gate's pre-activation)."""
        raise NotImplementedError

    def info(self) -> dict:
        """The store's attributes about the units."""
        raise NotImplementedError

    def output_rows(self, layers: list[int]) -> torch.Tensor | None:
        """float32 [rows, M, d_model]: what each unit writes to the residual stream per unit of its
        activation (core.logits), or None where that is not a residual-stream vector."""
        return None


class MLPNeurons(UnitSource):
    """A model's MLP neurons: x at `mlp.hook_in`, activation at `mlp.hook_post`, weights W_in, b_in."""

    kind = "mlp-neuron"

    def __init__(self, lm: LoadedModel | None, model: str, n_units: int | None = None, d_input: int | None = None):
        self.lm, self.model = lm, model
        self.n_units = lm.d_mlp if lm is not None else int(n_units)
        self.d_input = lm.d_model if lm is not None else int(d_input)

    @classmethod
    def for_bridge(cls, bridge) -> "MLPNeurons":
        """The MLP neurons of a bridge, for the scan alone (no weights or store attributes)."""
        return cls(None, "", int(bridge.cfg.d_mlp), int(bridge.cfg.d_model))

    def taps(self, layer: int, need_x: bool = True) -> tuple[str, ...]:
        post = HOOK_ACTIVATION.format(layer=layer)
        return (HOOK_INPUT.format(layer=layer), post) if need_x else (post,)

    def read(self, captured, layer, need_x=True):
        x = captured[HOOK_INPUT.format(layer=layer)] if need_x else None
        return captured[HOOK_ACTIVATION.format(layer=layer)], x

    def weights(self, layers):
        w, b = mlp_weights(self.lm, list(layers))
        return {"W_in": w, "b_in": b}

    def output_rows(self, layers):
        return out_weights(self.lm, list(layers))

    def info(self) -> dict:
        lm = self.lm
        return {"model": self.model, "unit": self.kind, "d_model": lm.d_model, "d_mlp": lm.d_mlp,
                "d_embed": self.d_embed, "embedding": self.embedding, "gated": False,
                "weights": lm.weights, "hook_input": HOOK_INPUT, "hook_pre": HOOK_PRE,
                "hook_activation": HOOK_ACTIVATION, "model_n_layers": lm.n_layers, **versions()}


class GatedMLPNeurons(MLPNeurons):
    """Gated MLP neurons (Llama, Qwen, Gemma, Mistral, SmolLM): a_j = act(w_gate_j . x + b_gate_j) *
    (w_in_j . x + b_in_j). The embedding is [x * w_gate_j ; x * w_in_j]: its first half sums (+ b_gate)
    to `hook_pre`, its second (+ b_in) to `hook_pre_linear`. Missing biases are zeros."""

    embedding = "x*W_gate|x*W_in"

    def weights(self, layers):
        w_gate, b_gate = gate_weights(self.lm, list(layers))
        return {"W_gate": w_gate, "b_gate": b_gate, **super().weights(layers)}

    def info(self) -> dict:
        return {**super().info(), "gated": True, "hook_pre_linear": HOOK_PRE_LINEAR}


class SAEFeatures(UnitSource):
    """An SAE's features, on the SAE's hook h: x = the encoder's input (h - b_dec where the SAE
    subtracts it), activation = the feature activations, weights W_enc, b_enc. One store row."""

    kind = "sae-feature"
    embedding = "x*W_enc"

    def __init__(self, lm: LoadedModel, model: str, sae_path: str):
        self.mlp = MLPNeurons(lm, model)
        self.sae, self.path = load_sae_cached(sae_path), sae_path
        self.n_units, self.d_input = self.sae.d_sae, self.sae.d_in

    def taps(self, layer: int, need_x: bool = True) -> tuple[str, ...]:
        assert layer == self.sae.layer, "an SAE store has one row, the SAE's layer"
        return (self.sae.hook_name,)

    def read(self, captured, layer, need_x=True):
        t = captured[self.sae.hook_name]
        h = t.reshape(-1, t.shape[-1]).float()  # the SAE's weights are float32, whatever the forward's dtype
        weights = sae_on_device(self.sae, t.device)
        post = weights.encode(h).reshape(*t.shape[:-1], -1)
        return post, weights.encoder_input(h).reshape(t.shape[:-1] + h.shape[-1:]) if need_x else None

    def weights(self, layers):
        w, b = sae_weights_for_store(self.sae)
        return {"W_in": w, "b_in": b}

    def output_rows(self, layers):
        """The decoder rows W_dec[j] of an SAE on the residual stream (hook_resid_*, hook_mlp_out,
        hook_attn_out), W_dec[j] @ W_out of one on mlp.hook_post; None on any other hook."""
        w_dec, hook = self.sae.W_dec.detach().float().cpu(), self.sae.hook_name
        if MLP_POST_HOOK.search(hook):
            w_dec = w_dec @ self.mlp.output_rows([self.sae.layer])[0]
        elif not RESIDUAL_HOOK.search(hook):
            return None
        return w_dec[None] if w_dec.shape[-1] == self.mlp.lm.d_model else None

    def info(self) -> dict:
        return {**self.mlp.info(), **sae_model_info(self.sae, self.path)}


def sae_on_device(sae, device):
    """The SAE's weights on `device` (a copy, made once per SAE and device)."""
    if str(sae.W_enc.device) == str(device):
        return sae
    cache = sae.__dict__.setdefault("_on_device", {})
    if str(device) not in cache:
        import dataclasses

        cache[str(device)] = dataclasses.replace(
            sae, W_enc=sae.W_enc.to(device), b_enc=sae.b_enc.to(device), W_dec=sae.W_dec.to(device),
            b_dec=sae.b_dec.to(device), threshold=None if sae.threshold is None else sae.threshold.to(device))
    return cache[str(device)]


UNIT_SOURCES: tuple[type[UnitSource], ...] = (MLPNeurons, GatedMLPNeurons, SAEFeatures)


def unit_source(lm: LoadedModel, model: str, sae: str | None = None) -> UnitSource:
    """The unit source of a run: an SAE's features when `sae` is given, else the MLP neurons
    (gated or plain, as the model's MLPs are)."""
    if sae is not None:
        return SAEFeatures(lm, model, sae)
    return GatedMLPNeurons(lm, model) if is_gated(lm) else MLPNeurons(lm, model)
