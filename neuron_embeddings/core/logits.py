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

import logging
from dataclasses import dataclass

import numpy as np
import torch

from neuron_embeddings.core.models import LoadedModel, is_causal_lm

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Screen:
    """W_U (finite columns) prepared for the bfloat16 screen of `logit_effects` on the CPU.

    For a row w and a column u, with w_h, u_h their roundings to bfloat16 and w_l = w - w_h,
    u_l = u - u_h (exact in float32), w . u = w_h . u_h + w_h . u_l + w_l . u. The bfloat16 product
    gives s ~ w_h . u_h: the products of bfloat16 values are exact in float32, summed in float32
    (error <= gamma_D |w_h| |u_h|, gamma_D = D 2^-24 / (1 - D 2^-24)) and rounded once to bfloat16
    (<= 2^-8 / (1 - 2^-8) |s|, taken as 2^-7 |s|). So

        |w . u - s| <= |w_h| (|u_l| + gamma_D |u_h|) + (|w_l| + 1e-10 |w|) |u| + 2^-7 |s|

    (Cauchy-Schwarz; the 1e-10 |w| |u| covers the float64 re-scoring's own error and the bound's
    evaluation). A column can rank among a row's k largest only if its upper bound reaches the k-th
    largest lower bound; those candidates are re-scored in float64 and ranked exactly."""

    W_VD: torch.Tensor  # float32 [V, D] the columns as rows, for re-scoring
    hi_DV: torch.Tensor  # bfloat16 [D, V]
    p_V: np.ndarray  # float64 [V] |u_l| + gamma_D |u_h|
    n_V: np.ndarray  # float64 [V] |u|


SCREEN_REL = 2.0 ** -7  # bound on the bfloat16 output's rounding, relative to the value
SCREEN_CANDIDATES = 256  # per row and side; a row with more is re-scored over every column


def bf16_screen(W_U_DV: torch.Tensor) -> Screen | None:
    """The bfloat16 screen of W_U (finite columns only), or None where it would not pay or not hold:
    not a CPU tensor, a CPU without native bfloat16 products, values out of bfloat16's range, or a
    product that breaks the rounding the bound assumes (checked here on a sample)."""
    if W_U_DV.device.type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    W = W_U_DV.float()
    hi = W.bfloat16()
    if not bool(torch.isfinite(hi).all()):
        return None
    D = W.shape[0]
    gamma = D * 2.0 ** -24 / (1 - D * 2.0 ** -24)
    norm = lambda t: torch.linalg.vector_norm(t.double(), dim=0).numpy()  # noqa: E731
    screen = Screen(W_VD=W.T.contiguous(), hi_DV=hi, p_V=norm(W - hi.float()) + gamma * norm(hi.float()), n_V=norm(W))
    rows = torch.randn(64, D, generator=torch.Generator().manual_seed(0)).bfloat16()
    cols = hi[:, :4096]
    got = (rows @ cols).double()
    exact = rows.double() @ cols.double()  # products exact; float64 sums
    limit = gamma * torch.linalg.vector_norm(rows.double(), dim=1, keepdim=True) * torch.linalg.vector_norm(
        cols.double(), dim=0) + SCREEN_REL * got.abs() + 1e-30
    if not bool(((got - exact).abs() <= limit).all()):
        log.warning("this CPU's bfloat16 products round differently than the logit screen assumes: float32 used")
        return None
    return screen


def _screened_effects(rows_MD: torch.Tensor, screen: Screen, ids_V: torch.Tensor, k: int, chunk: int
                      ) -> dict[str, np.ndarray]:
    """`logit_effects` through the bfloat16 screen (`Screen`): the same tokens as ranking every
    float64 product, values rounded to float32."""
    from neuron_embeddings.core import logit_kernels as kern

    M, V = rows_MD.shape[0], screen.W_VD.shape[0]
    w_hi = rows_MD.bfloat16()
    w64, w_hi64 = rows_MD.double(), w_hi.double()
    a_M = torch.linalg.vector_norm(w_hi64, dim=1).numpy()
    c_M = (torch.linalg.vector_norm(w64 - w_hi64, dim=1) + 1e-10 * torch.linalg.vector_norm(w64, dim=1)
           ).numpy() + 1e-30
    top_lb, bot_ub = np.full((M, k), -np.inf), np.full((M, k), np.inf)
    X = SCREEN_CANDIDATES
    lists = {side: (np.zeros(M, np.int64), np.empty((M, X), np.int64), np.empty((M, X), np.float64))
             for side in ("top", "bottom")}
    scratch = np.empty(min(chunk, V), np.float32)
    for s in range(0, V, chunk):
        bits = (w_hi @ screen.hi_DV[:, s:s + chunk]).view(torch.int16).numpy()
        kern.screen_chunk(bits, s, a_M, c_M, screen.p_V[s:s + chunk], screen.n_V[s:s + chunk], SCREEN_REL, top_lb,
                          bot_ub, *lists["top"], *lists["bottom"], scratch, scratch.view(np.uint32))
    rows32 = rows_MD.float().contiguous().numpy()
    ids = ids_V.numpy()
    out = {}
    for name, sign in (("top", 1.0), ("bottom", -1.0)):
        vals, cols = np.zeros((M, k)), np.full((M, k), -1, np.int64)
        count, col_MX, _ = lists[name]
        kern.rescore(rows32, screen.W_VD.numpy(), count, col_MX, sign, vals, cols)
        found = cols >= 0
        out[f"{name}_tokens"] = np.where(found, ids[np.maximum(cols, 0)], -1).astype(np.int32)
        out[f"{name}_values"] = np.where(found, vals, np.nan).astype(np.float32)
    return out


def logit_effects(rows_MD: torch.Tensor, W_U_DV: torch.Tensor, k: int = 10, chunk: int = 16384,
                  ids_V: torch.Tensor | None = None, compiled: bool | None = None,
                  screen: Screen | None = None) -> dict[str, np.ndarray]:
    """Per row w_j of `rows_MD`, the k tokens of largest and of smallest w_j @ W_U (module docstring):
    {"top_tokens", "bottom_tokens": int32 [M, k], "top_values", "bottom_values": float32 [M, k]},
    strongest first (bottom: most negative first); token -1 and NaN past the number of tokens.
    Columns of W_U that are not finite are left out (`ids_V` given: W_U is already `finite_columns`'s,
    these its token ids). Computed `chunk` vocabulary columns at a time (memory M x chunk), in float32
    on W_U's device; each chunk's extremes picked by core.logit_kernels (`compiled`, default on the
    CPU) or `torch.topk`; ties in any order. With `screen` (`bf16_screen` of the same finite W_U;
    compiled path only) the products run in bfloat16 and the candidates they leave are re-scored
    in float64: the ranking of the float64 products, ties by token id."""
    if ids_V is None:
        W_U_DV, ids_V = finite_columns(W_U_DV)
    rows = rows_MD.to(device=W_U_DV.device, dtype=torch.float32)
    M, V = rows.shape[0], W_U_DV.shape[1]
    if W_U_DV.device.type == "cpu" if compiled is None else compiled:
        if screen is not None:
            return _screened_effects(rows, screen, ids_V, k, chunk)
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
