"""Sparse-autoencoder weights on disk, in SAELens's layout.

A directory holds `cfg.json` and `sae_weights.safetensors` with the tensors
`W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in] (plus `threshold`
[d_sae] for a JumpReLU SAE). SAELens has two generations of `cfg.json`:

- before 6.0: every key at the top level (`hook_name`, `hook_layer`, `model_name`,
  `context_size`, `dataset_path`, `activation_fn_str`, `activation_fn_kwargs: {k}` for TopK, ...);
- 6.0 and later: the SAE's own keys (`d_in`, `d_sae`, `dtype`, `architecture`, `k`,
  `apply_b_dec_to_input`, `normalize_activations`, ...) at the top level and the facts about where it
  attaches under `metadata: {hook_name, model_name, hook_layer, ...}`.

`load_sae` reads both. `save_sae` writes the top-level keys of the old layout *and* a `metadata`
block, without claiming a SAELens version: SAELens 6 then reads it through its pre-6 conversion
(which rebuilds `metadata` from the top-level keys) and SAELens 5 ignores the extra block.
SAELens itself is not a dependency (it pins transformer-lens < 4).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_embeddings.core.errors import UserError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
_LAYER_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class SAEWeights:
    """An SAE's parameters (float32, CPU) and its `cfg.json` contents.

    `encode`/`decode` follow SAELens's inference maths for the supported architectures, so a
    feature's pre-activation is `encoder_input(h) @ W_enc + b_enc`.
    """

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    cfg: dict
    threshold: torch.Tensor | None = None  # [d_sae], JumpReLU only

    # -- facts from cfg.json (either generation) ---------------------------------------------
    def _get(self, key: str, default=None):
        if key in self.cfg and self.cfg[key] is not None:
            return self.cfg[key]
        meta = self.cfg.get("metadata") or self.cfg.get("meta") or {}
        value = meta.get(key)
        return default if value is None else value

    @property
    def hook_name(self) -> str:
        name = self._get("hook_name") or self._get("hook_point")
        if not name:
            raise UserError("SAE cfg.json has no hook_name (top level or under metadata)")
        return str(name)

    @property
    def layer(self) -> int:
        layer = self._get("hook_layer")
        if layer is not None:
            return _int(layer, "hook_layer")
        m = _LAYER_RE.search(self.hook_name)
        if not m:
            raise UserError(f"SAE hook_name {self.hook_name!r} names no block (blocks.L.) and cfg.json has no hook_layer")
        return int(m.group(1))

    @property
    def architecture(self) -> str:
        return str(self._get("architecture", "standard"))

    @property
    def apply_b_dec_to_input(self) -> bool:
        return bool(self._get("apply_b_dec_to_input", True))

    @property
    def topk(self) -> int | None:
        if self.architecture != "topk":
            return None
        k = self._get("k")
        if k is None:
            k = (self._get("activation_fn_kwargs") or {}).get("k")
        return None if k is None else _int(k, "k")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def model_name(self) -> str | None:
        name = self._get("model_name")
        return None if name is None else str(name)

    # -- maths -------------------------------------------------------------------------------
    def encoder_input(self, h_ND: torch.Tensor) -> torch.Tensor:
        """What the encoder sees: h - b_dec where the SAE subtracts the decoder bias first."""
        h_ND = h_ND.to(self.W_enc.dtype)
        return h_ND - self.b_dec if self.apply_b_dec_to_input else h_ND

    def pre_activation(self, h_ND: torch.Tensor) -> torch.Tensor:
        """[N, d_sae] pre-activations `encoder_input(h) @ W_enc + b_enc`."""
        return self.encoder_input(h_ND) @ self.W_enc + self.b_enc

    def encode(self, h_ND: torch.Tensor) -> torch.Tensor:
        """[N, d_sae] feature activations (ReLU; TopK keeps the k largest of ReLU(pre);
        JumpReLU keeps pre where pre > threshold)."""
        pre_NF = self.pre_activation(h_ND)
        if self.architecture == "jumprelu":
            return pre_NF * (pre_NF > self.threshold)
        f_NF = torch.relu(pre_NF)
        if self.architecture == "topk":
            vals_NK, idx_NK = f_NF.topk(min(self.topk, self.d_sae), dim=-1)
            return torch.zeros_like(f_NF).scatter_(-1, idx_NK, vals_NK)
        return f_NF

    def decode(self, f_NF: torch.Tensor) -> torch.Tensor:
        """[N, d_in] reconstruction `f @ W_dec + b_dec`."""
        return f_NF.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def _int(value, key: str) -> int:
    """A cfg.json number (an int or a string of digits), or a one-line UserError naming the key."""
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise UserError(f"SAE cfg.json: {key} is {value!r}, not a non-negative whole number; correct it")
    return int(value)


def _validate(w: SAEWeights, where: str) -> None:
    """One-line UserErrors for anything `encode`/`decode` could not honour."""
    if w.W_enc.ndim != 2:
        raise UserError(f"{where}: W_enc must be 2-D [d_in, d_sae], got shape {tuple(w.W_enc.shape)}")
    d_in, d_sae = w.W_enc.shape
    if d_in == 0 or d_sae == 0:
        raise UserError(f"{where}: W_enc has shape {tuple(w.W_enc.shape)}; an SAE needs at least one input and one feature")
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        got = tuple(getattr(w, name).shape)
        if got != shape:
            raise UserError(f"{where}: {name} has shape {got}, expected {shape} "
                            f"(W_enc is [d_in={d_in}, d_sae={d_sae}])")
    for key, value in (("d_in", d_in), ("d_sae", d_sae)):
        if key in w.cfg and w.cfg[key] is not None and _int(w.cfg[key], key) != value:
            raise UserError(f"{where}: cfg.json says {key}={w.cfg[key]} but the weights have {value}")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(w, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise UserError(f"{where}: {name} holds NaN or infinite values; the SAE's weights are damaged or diverged")
    arch = w.architecture
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if arch == "topk" and (w.topk is None or w.topk < 1):
        raise UserError(f"{where}: a topk SAE needs k >= 1 in cfg.json (k or activation_fn_kwargs.k)")
    if arch == "jumprelu" and (w.threshold is None or tuple(w.threshold.shape) != (d_sae,)):
        raise UserError(f"{where}: a jumprelu SAE needs a threshold tensor of shape ({d_sae},)")
    act = w._get("activation_fn_str") or w._get("activation_fn") or "relu"
    if arch == "standard" and act not in ("relu",):
        raise UserError(f"{where}: activation function {act!r} is not supported (relu only for standard SAEs)")
    norm = w._get("normalize_activations", "none")
    if norm not in ("none", False):
        raise UserError(f"{where}: normalize_activations={norm!r} is not supported; fold the scaling into "
                        "the weights first (SAELens: fold_activation_norm_scaling_factor) and set it to none")
    if w._get("hook_head_index") is not None:
        raise UserError(f"{where}: SAEs on one attention head (hook_head_index) are not supported")
    w.hook_name  # noqa: B018 - raises a UserError when missing
    w.layer  # noqa: B018


def load_sae(path) -> SAEWeights:
    """Read an SAE directory in SAELens's layout (either cfg.json generation) as float32 on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"--sae {path}"
    d = Path(path).expanduser()
    if not d.is_dir():
        raise UserError(f"{where}: no such directory")
    cfg_path, w_path = d / CFG_FILENAME, d / WEIGHTS_FILENAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise UserError(f"{where}: missing {p.name} (an SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: {CFG_FILENAME} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: {CFG_FILENAME} must hold a JSON object")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{where}: cannot read {WEIGHTS_FILENAME} ({e})") from e
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
    if missing:
        raise UserError(f"{where}: {WEIGHTS_FILENAME} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")
    f32 = {k: v.float().contiguous() for k, v in tensors.items()}
    w = SAEWeights(W_enc=f32["W_enc"], b_enc=f32["b_enc"], W_dec=f32["W_dec"], b_dec=f32["b_dec"],
                   cfg=cfg, threshold=f32.get("threshold"))
    _validate(w, where)
    return w


def saelens_cfg(weights: SAEWeights) -> dict:
    """cfg.json contents both SAELens generations read (see the module docstring)."""
    w = weights
    arch = w.architecture
    meta = {
        "model_name": w.model_name,
        "hook_name": w.hook_name,
        "hook_layer": w.layer,
        "hook_head_index": None,
        "context_size": w._get("context_size"),
        "prepend_bos": bool(w._get("prepend_bos", True)),
        "dataset_path": w._get("dataset_path"),
        "model_from_pretrained_kwargs": w._get("model_from_pretrained_kwargs", {}),
    }
    cfg = {k: v for k, v in w.cfg.items() if k not in ("metadata", "meta")}  # extra keys (training settings) kept
    cfg.update({
        "architecture": arch,
        "d_in": w.d_in,
        "d_sae": w.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": w.apply_b_dec_to_input,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": w.topk} if arch == "topk" else {},
        "dataset_trust_remote_code": True,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        **meta,
        "metadata": meta,
    })
    if arch == "topk":
        cfg["k"] = w.topk
    return cfg


def save_sae(path, weights: SAEWeights) -> None:
    """Write `cfg.json` and `sae_weights.safetensors` (float32) into `path` (created if needed).

    The weights file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    _validate(weights, f"save_sae {path}")
    d = Path(path).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: getattr(weights, k).detach().float().cpu().contiguous()
               for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if weights.threshold is not None:
        tensors["threshold"] = weights.threshold.detach().float().cpu().contiguous()
    tmp = d / (WEIGHTS_FILENAME + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(d / WEIGHTS_FILENAME)
    tmp_cfg = d / (CFG_FILENAME + ".tmp")
    tmp_cfg.write_text(json.dumps(saelens_cfg(weights), indent=2, sort_keys=True))
    tmp_cfg.replace(d / CFG_FILENAME)
