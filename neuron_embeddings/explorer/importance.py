"""Token importance: how much a neuron's activation at an example's max token drops when each other
token of the shown window is replaced.

The replacement is the tokenizer's mask token if it has one (BERT-style models were trained to see
`[MASK]` in place of a token), else its BOS/EOS token (GPT-2's `<|endoftext|>`, which also separates
documents in the scanned rows), else its pad token, else token 0. The example's whole row is the
context (exactly what the scan fed the model); the original row and one copy per replaced position
go through one batched forward, stopped right after the hook that gives the activation. For a
causal model only preceding tokens can change the activation (later ones show a drop of 0).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.models import HOOK_ACTIVATION, capture, is_causal_lm, load_model

IMPORTANCE_CACHE = "importance.json"  # the explorer's cache file (`STORE/_explorer/`)


def replacement_token(tokenizer) -> tuple[int, str]:
    """(token id, why) of the token that stands in for a replaced one."""
    for attr, why in (("mask_token_id", "mask token"), ("bos_token_id", "BOS token"),
                      ("eos_token_id", "EOS token"), ("pad_token_id", "pad token")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid), why
    return 0, "token 0"


def replaced_batch(row_T: np.ndarray, positions: list[int], replacement: int) -> np.ndarray:
    """int64 [1 + P, T]: the row, then one copy per position with that token replaced."""
    batch = np.repeat(np.asarray(row_T, dtype=np.int64)[None], len(positions) + 1, axis=0)
    batch[np.arange(1, len(positions) + 1), positions] = replacement
    return batch


class ImportanceModel:
    """A model (and for an SAE store, its SAE) that computes unit activations at one position."""

    def __init__(self, model: str, attrs: dict, device: str = "auto"):
        self.lm = load_model(model, device, attrs.get("dtype", "float32"))
        self.attrs = attrs
        self.sae = None
        if attrs.get("unit") == "sae-feature":
            from neuron_embeddings.core.units import load_sae_cached

            self.sae = load_sae_cached(attrs["sae_path"])
        self._check()
        self.causal = is_causal_lm(self.lm.bridge)
        self.replacement, self.replacement_why = replacement_token(self.lm.tokenizer)
        self.replacement_text = str(self.lm.tokenizer.convert_ids_to_tokens(self.replacement))
        self._lock = threading.Lock()

    def _check(self) -> None:
        a, lm = self.attrs, self.lm
        if self.sae is None and (int(a["d_mlp"]) != lm.d_mlp or max(a["layers"]) >= lm.n_layers):
            raise UserError(f"--model: it has {lm.n_layers} layers x {lm.d_mlp} MLP neurons, but the store "
                            f"has layers {a['layers']} x {a['d_mlp']}; give the model the store was made with "
                            f"({a.get('model')})")
        if int(a.get("d_vocab", 0)) and int(a["d_vocab"]) != len(lm.tokenizer):
            raise UserError(f"--model: its tokenizer has {len(lm.tokenizer)} tokens, the store's vocabulary "
                            f"{a['d_vocab']}; give the model the store was made with ({a.get('model')})")

    def activations(self, batch_BT: np.ndarray, layer: int, unit: int, pos: int) -> np.ndarray:
        """float64 [B]: the unit's activation at `pos` in each row, from one forward."""
        hook = self.sae.hook_name if self.sae is not None else HOOK_ACTIVATION.format(layer=layer)
        ids = torch.from_numpy(batch_BT).to(self.lm.device)
        with self._lock, torch.inference_mode():
            t = capture(self.lm.bridge, ids, [hook])[hook][:, pos]
        val = self.sae.encode(t.to(self.sae.W_enc.device))[:, unit] if self.sae is not None else t[:, unit]
        return val.double().cpu().numpy()

    def importance(self, row_T: np.ndarray, layer: int, unit: int, pos: int, positions: list[int]) -> dict:
        """The unit's activation at `pos` in the row, and its drop when each of `positions` is
        replaced (original minus replaced: positive = the token helped)."""
        acts = self.activations(replaced_batch(row_T, positions, self.replacement), layer, unit, pos)
        return {"original": float(acts[0]), "positions": [int(p) for p in positions],
                "drop": [float(acts[0] - a) for a in acts[1:]], "replacement": self.replacement_text,
                "replacement_why": self.replacement_why}


class ImportanceCache:
    """Results by (layer, unit, slot): in memory, and in the explorer's cache `importance.json`
    (`STORE/_explorer/`) when the store is writable."""

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        cached = store.read_explorer_cache(IMPORTANCE_CACHE)
        try:
            self.data = json.loads(cached) if cached is not None else {}
        except ValueError:
            self.data = {}
        if not isinstance(self.data, dict):
            self.data = {}

    @staticmethod
    def key(layer: int, unit: int, slot: int) -> str:
        return f"{layer}/{unit}/{slot}"

    def get(self, layer: int, unit: int, slot: int) -> dict | None:
        return self.data.get(self.key(layer, unit, slot))

    def put(self, layer: int, unit: int, slot: int, value: dict) -> None:
        with self._lock:
            self.data[self.key(layer, unit, slot)] = value
            try:
                self.store.write_explorer_cache(IMPORTANCE_CACHE, json.dumps(self.data).encode())
            except OSError:  # read-only store: memory only
                pass
