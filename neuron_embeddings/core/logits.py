"""Logit effects: the tokens each unit's output promotes and suppresses most directly.

A unit writes w_j to the residual stream per unit of activation: `W_out[j]` for an MLP neuron (the
down projection's row for gated MLPs), the decoder row `W_dec[j]` for an SAE feature on the residual
stream (`W_dec[j] @ W_out` for one on `mlp.hook_post`). Its direct effect on the logits, ignoring
every later layer and the final norm's scale 1/sigma, is

    value[j, t] = w_j . W_U'[:, t]

with W_U' the unembedding as TransformerLens folds it (`fold_ln`, `center_unembed`; the
TransformerBridge's `W_U` in compatibility mode, float32 of the forward's dtype):

    LayerNorm (GPT-2):  W_U' = C_D diag(g) W_U C_V
    RMSNorm (Llama):    W_U' =     diag(g) W_U C_V

g is the final norm's gain, W_U [d_model, d_vocab] the LM head's weight transposed, C_D centres each
column over d_model (what the LayerNorm's mean subtraction does to w_j; TransformerLens' centring of
W_out, `center_writing_weights`, gives the same values) and C_V centres each row over the vocabulary.
C_V subtracts from each unit's values one constant, their mean over the vocabulary: the values are
logit changes relative to the average token (each unit's values sum to 0 over the vocabulary), the
rankings are those of the uncentred products. Biases (b_U, the final norm's bias) are the same for
every unit and left out.
"""
from __future__ import annotations

import numpy as np
import torch

from neuron_embeddings.core.models import LoadedModel, is_causal_lm


def unembedding(lm: LoadedModel) -> torch.Tensor | None:
    """float32 [d_model, d_vocab]: the folded unembedding W_U' (module docstring) of a causal LM; None
    for a model without one (an encoder such as BERT / MiniLM: its masked-LM head, where there is one,
    is not linear)."""
    if not is_causal_lm(lm.bridge):
        return None
    try:
        w = lm.bridge.W_U
    except (AttributeError, KeyError, RuntimeError):
        return None
    if w is None or w.ndim != 2 or w.shape[0] != lm.d_model:
        return None
    return w.detach().float().cpu()


def to_vocab(W_U_DV: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """W_U with exactly `n_vocab` columns, one per entry of the tokenizer's vocabulary: columns past
    the tokenizer's (padding of the model's vocabulary) dropped, NaN for tokens the model has no
    column for (`logit_effects` leaves those out)."""
    D, V = W_U_DV.shape
    if V >= n_vocab:
        return W_U_DV[:, :n_vocab].contiguous()
    return torch.cat([W_U_DV, torch.full((D, n_vocab - V), float("nan"), dtype=W_U_DV.dtype)], dim=1)


def _merge(best: tuple | None, vals: torch.Tensor, toks: torch.Tensor, k: int, largest: bool) -> tuple:
    """The k best of the (values, tokens) kept so far and a new chunk's own k best."""
    if best is not None:
        vals, toks = torch.cat([best[0], vals], 1), torch.cat([best[1], toks], 1)
    v, i = vals.topk(min(k, vals.shape[1]), dim=1, largest=largest)
    return v, toks.gather(1, i)


def finite_columns(W_U_DV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W_U without its columns that are not finite (tokens the model has no column for), and the
    token id of each column kept (int64 [V'])."""
    valid = torch.isfinite(W_U_DV.sum(0))  # a NaN column sums to NaN (one pass; isfinite(W).all(0) is ~20x slower)
    ids = torch.arange(W_U_DV.shape[1], device=W_U_DV.device)
    if bool(valid.all()):
        return W_U_DV, ids
    return W_U_DV[:, valid], ids[valid]


def logit_effects(rows_MD: torch.Tensor, W_U_DV: torch.Tensor, k: int = 10, chunk: int = 16384,
                  ids_V: torch.Tensor | None = None, compiled: bool | None = None) -> dict[str, np.ndarray]:
    """Per row w_j of `rows_MD`, the k tokens of largest and of smallest w_j @ W_U (module docstring):
    {"top_tokens", "bottom_tokens": int32 [M, k], "top_values", "bottom_values": float32 [M, k]},
    strongest first (bottom: most negative first); token -1 and NaN past the number of tokens.
    Columns of W_U that are not finite are left out (`ids_V` given: W_U is already `finite_columns`'s,
    these its token ids). Computed `chunk` vocabulary columns at a time (memory M x chunk), in float32
    on W_U's device; each chunk's extremes picked by core.logit_kernels (`compiled`, default on the
    CPU) or `torch.topk`; ties in any order."""
    if ids_V is None:
        W_U_DV, ids_V = finite_columns(W_U_DV)
    rows = rows_MD.to(device=W_U_DV.device, dtype=torch.float32)
    M, V = rows.shape[0], W_U_DV.shape[1]
    if W_U_DV.device.type == "cpu" if compiled is None else compiled:
        return _compiled_effects(rows, W_U_DV, ids_V, k, chunk)
    top = bottom = None
    for s in range(0, V, chunk):
        scores = rows @ W_U_DV[:, s:s + chunk]  # [M, c]
        c = min(k, scores.shape[1])
        for largest in (True, False):  # each chunk's own k best first: only [M, 2k] values are merged
            v, i = scores.topk(c, dim=1, largest=largest)
            if largest:
                top = _merge(top, v, ids_V[s + i], k, True)
            else:
                bottom = _merge(bottom, v, ids_V[s + i], k, False)
    out = {}
    for name, best in (("top", top), ("bottom", bottom)):
        v = np.full((M, k), np.nan, dtype=np.float32)
        i = np.full((M, k), -1, dtype=np.int32)
        if best is not None:
            n = best[0].shape[1]
            v[:, :n] = best[0].cpu().numpy()
            i[:, :n] = best[1].cpu().numpy()
        out[f"{name}_tokens"], out[f"{name}_values"] = i, v
    return out


def _compiled_effects(rows_MD: torch.Tensor, W_U_DV: torch.Tensor, ids_V: torch.Tensor, k: int, chunk: int
                      ) -> dict[str, np.ndarray]:
    """`logit_effects` on the CPU: one pass of core.logit_kernels over each chunk's scores (torch.topk
    took a third of the stage, two sorts per chunk)."""
    from neuron_embeddings.core.logit_kernels import merge_extremes

    M, V = rows_MD.shape[0], W_U_DV.shape[1]
    top_v, bot_v = np.full((M, k), -np.inf, np.float32), np.full((M, k), np.inf, np.float32)
    top_i, bot_i = np.full((M, k), -1, np.int64), np.full((M, k), -1, np.int64)
    ids = ids_V.numpy()
    for s in range(0, V, chunk):
        scores = rows_MD @ W_U_DV[:, s:s + chunk]  # [M, c]
        merge_extremes(scores.numpy(), ids[s:s + chunk], top_v, top_i, bot_v, bot_i)
    out = {}
    for name, v, i in (("top", top_v, top_i), ("bottom", bot_v, bot_i)):
        v[i < 0] = np.nan
        out[f"{name}_tokens"], out[f"{name}_values"] = i.astype(np.int32), v
    return out
