"""Sparse autoencoders on cached activations, with the neuron-embedding loss L_N.

The SAE (names as in SAELens, shapes in suffixes: B batch, D d_in, F d_sae):

    u = x - b_dec                        (the encoder input)
    f = ReLU(u @ W_enc + b_enc)          (TopK: keep the k largest of those)
    x_hat = f @ W_dec + b_dec            (rows of W_dec kept at unit norm)
    loss = sum_d (x_hat - x)^2 (mean over the batch) + l1 * sum_j f_j (mean over the batch) + ln_coef * L_N

L_N (Foote 2024, eq. 4): for every input b and every feature j active on it,
`1 - cos(h̄_j ⊙ w_j, h_b ⊙ w_j)`, summed over the batch and the active features. `w_j` is the
encoder column W_enc[:, j]; `h_b` is the encoder input u_b = x_b - b_dec, and h̄_j - b_dec with h̄_j
a per-feature average of the raw inputs x that activated j (the lookup). Using the encoder input
makes L_N the same cosine as the evaluation's neuron embeddings `(x - b_dec) ⊙ W_enc[:, j]` (the
lookup keeps raw x, so the current b_dec is subtracted exactly: a mean of x minus b_dec is the mean
of x - b_dec). The lookup is a detached buffer, and so is b_dec inside L_N: L_N's gradient goes
into the encoder weights W_enc only, the loss that shapes each feature's encoder column; b_dec, the
offset shared by every feature, is left to the reconstruction (letting L_N move it would let it align
all inputs at once instead of shaping features, and costs two more sparse products per step; the
autograd function computes those gradients too when asked, which the tests check).
First activation stores the batch's mean activating
input, then an exponential moving average per batch (momentum m: h̄ <- m h̄ + (1 - m) batch mean) or
the exact running mean over all activating inputs seen.

L_N is computed with matrix products, never a loop over features (ū = h̄ - b_dec):
    num   = u_BD @ (ū_FD ⊙ W_enc^T²)^T = Σ_d u_bd ū_jd w_dj²
    nb    = (u_BD ⊙ u_BD) @ W_enc²     = |u_b ⊙ w_j|²
    nh_F  = Σ_d ū_jd² w_dj²            = |ū_j ⊙ w_j|²
    cos   = num / sqrt(nb · nh)
evaluated only at the active (b, j) pairs (sampled products, see ActivePairs), and a custom backward
pass over the same pairs. The SAE's own training pass also runs over the active pairs (only the
encoder's pre-activations are a dense product), which is what makes it faster than a plain PyTorch
SAE (benchmarks/bench_sae.py).

Inputs are scaled by a constant s (so that E||s x||² = d_in, Anthropic's convention) while
training, which makes `--l1` mean the same on any model; the saved weights act on raw activations
(b_enc and b_dec divided by s; feature activations come out divided by s, W_dec stays unit-norm).
Dead features are resampled as in Towards Monosemanticity: inputs drawn with probability ∝ their
squared reconstruction loss become the dead features' decoder rows and (scaled) encoder columns,
with their Adam state reset.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from neuron_embeddings.core.sae_io import SAEWeights
# the training settings live with the other settings (light to import: the CLI reads their defaults)
from neuron_embeddings.core.settings import ARCHITECTURES, LN_UPDATES, SAETrainSettings  # noqa: F401

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

DENSE_THRESHOLD = 0.1  # fraction of firings above which a feature counts as dense
SPARSE_MAX_DENSITY = 0.02  # above this share of active pairs, products over them run dense (see ActivePairs)


# --- the model --------------------------------------------------------------------------------

class SparseAutoencoder(nn.Module):
    """A standard (ReLU) or TopK SAE with unit-norm decoder rows; works in the training scale."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "standard", k: int | None = None,
                 seed: int = 0, device: str = "cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W_dec_FD = torch.randn(d_sae, d_in, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD.to(device))
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous().to(device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))
        self.architecture, self.k = architecture, k

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def activate(self, pre_BF: torch.Tensor) -> torch.Tensor:
        f_BF = torch.relu(pre_BF)
        if self.architecture == "topk":
            vals_BK, idx_BK = f_BF.topk(min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(f_BF).scatter(-1, idx_BK, vals_BK)
        return f_BF

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder input u, feature activations f, reconstruction x_hat)."""
        u_BD = x_BD - self.b_dec
        f_BF = self.activate(u_BD @ self.W_enc + self.b_enc)
        return u_BD, f_BF, f_BF @ self.W_dec + self.b_dec

    def forward_train(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ActivePairs]:
        """(f, x_hat, active pairs), the same values as `forward` with a backward pass over the active
        pairs only (see _SAEDecode)."""
        holder: dict = {}
        xhat_BD, f_BF = _SAEDecode.apply(x_BD, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.architecture,
                                         self.k, holder)
        return f_BF, xhat_BD, holder["pairs"]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) row: it would only change the norm."""
        if self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g -= (g * W).sum(dim=1, keepdim=True) * W

    def to_weights(self, scale: float, cfg: dict) -> SAEWeights:
        """Weights acting on raw activations (see the module docstring for the scale fold)."""
        return SAEWeights(W_enc=self.W_enc.detach().float().cpu().clone(),
                          b_enc=(self.b_enc.detach() / scale).float().cpu(),
                          W_dec=self.W_dec.detach().float().cpu().clone(),
                          b_dec=(self.b_dec.detach() / scale).float().cpu(), cfg=cfg)


# --- products over the active (input, feature) pairs --------------------------------------------

class ActivePairs:
    """The (b, j) pairs where a [B, F] mask is true, and the products the SAE and L_N need over them.

    Trained SAEs keep well under 1% of the pairs active, so those products run as sparse kernels
    (CSR: S @ D, S^T @ A, and the sampled product (A @ C)[pairs]) at a fraction of a dense product's
    cost; when more than `max_density` of the pairs are active (early in training) they run as
    dense products, which are then cheaper. Values `vals_n` follow the pairs' row-major order."""

    def __init__(self, mask_BF: torch.Tensor, max_density: float | None = None):
        self.shape = tuple(mask_BF.shape)
        B, F = self.shape
        self.b, self.f = mask_BF.nonzero(as_tuple=True)
        self.n = int(self.b.numel())
        limit = SPARSE_MAX_DENSITY if max_density is None else max_density
        self.sparse = self.n <= limit * B * F
        if self.sparse:
            dev = mask_BF.device
            self.crow = torch.zeros(B + 1, dtype=torch.int64, device=dev)
            self.crow[1:] = torch.bincount(self.b, minlength=B).cumsum(0)
            self.order = torch.argsort(self.f, stable=True)  # feature-major order, for S^T
            self.crow_t = torch.zeros(F + 1, dtype=torch.int64, device=dev)
            self.crow_t[1:] = torch.bincount(self.f, minlength=F).cumsum(0)
            self.col_t = self.b[self.order]

    def _csr(self, vals_n):
        return torch.sparse_csr_tensor(self.crow, self.f, vals_n, self.shape, check_invariants=False)

    def _csr_t(self, vals_n):
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, vals_n[self.order], self.shape[::-1],
                                       check_invariants=False)

    def dense(self, vals_n: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=vals_n.dtype, device=vals_n.device)
        out[self.b, self.f] = vals_n
        return out

    def sample(self, A_BK: torch.Tensor, C_KF: torch.Tensor) -> torch.Tensor:
        """(A @ C) at the pairs: [n]."""
        if not self.sparse:
            return (A_BK @ C_KF)[self.b, self.f]
        if self.n == 0:
            return A_BK.new_zeros(0)
        zeros = torch.zeros(self.n, dtype=A_BK.dtype, device=A_BK.device)
        return torch.sparse.sampled_addmm(self._csr(zeros), A_BK, C_KF, beta=0.0).values()

    def mm(self, vals_n: torch.Tensor, D_FK: torch.Tensor) -> torch.Tensor:
        """S @ D: [B, K]."""
        return self._csr(vals_n) @ D_FK if self.sparse else self.dense(vals_n) @ D_FK

    def tmm(self, vals_n: torch.Tensor, A_BK: torch.Tensor) -> torch.Tensor:
        """S^T @ A: [F, K]."""
        return self._csr_t(vals_n) @ A_BK if self.sparse else self.dense(vals_n).T @ A_BK


class _SAEDecode(torch.autograd.Function):
    """x_hat = f @ W_dec + b_dec with f = act(u @ W_enc + b_enc), u = x - b_dec, returning
    (x_hat, f); the backward pass works over the active pairs only. Exact for ReLU and TopK: an
    inactive entry of f has zero gradient through the activation either way."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, architecture, k, holder):
        u_BD = x_BD - b_dec_D
        pre_BF = u_BD @ W_enc_DF + b_enc_F
        f_BF = torch.relu(pre_BF)
        if architecture == "topk":
            vals_BK, idx_BK = f_BF.topk(min(k, f_BF.shape[1]), dim=-1)
            f_BF = torch.zeros_like(f_BF).scatter_(-1, idx_BK, vals_BK)
        pairs = ActivePairs(f_BF > 0)
        f_n = f_BF[pairs.b, pairs.f]
        xhat_BD = pairs.mm(f_n, W_dec_FD) + b_dec_D
        ctx.pairs = pairs
        ctx.save_for_backward(u_BD, f_n, W_enc_DF, W_dec_FD)
        holder["pairs"] = pairs
        return xhat_BD, f_BF

    @staticmethod
    def backward(ctx, g_xhat_BD, g_f_BF):
        pairs = ctx.pairs
        u_BD, f_n, W_enc_DF, W_dec_FD = ctx.saved_tensors
        g_n = pairs.sample(g_xhat_BD, W_dec_FD.T)  # dL/df at the active pairs (= dL/dpre there)
        if g_f_BF is not None:
            g_n = g_n + g_f_BF[pairs.b, pairs.f]
        dW_dec = pairs.tmm(f_n, g_xhat_BD)
        dW_enc = pairs.tmm(g_n, u_BD).T
        db_enc = torch.zeros(pairs.shape[1], dtype=g_n.dtype, device=g_n.device).index_add_(0, pairs.f, g_n)
        du_BD = pairs.mm(g_n, W_enc_DF.T)
        db_dec = g_xhat_BD.sum(0) - du_BD.sum(0)
        return None, dW_enc, db_enc, dW_dec, db_dec, None, None, None


# --- L_N --------------------------------------------------------------------------------------

class _LNLoss(torch.autograd.Function):
    """Σ over the pairs of weight · (1 - cos(ū_j ⊙ w_j, u_b ⊙ w_j)), and its exact gradient w.r.t.
    u, ū and W (the last two computed only when asked). A pair where either vector is zero counts
    with cos = 0 and no gradient. Feature-major layout ([F, D]) throughout: every elementwise product
    runs on contiguous memory, and the sampled products read W's columns contiguously."""

    @staticmethod
    def forward(ctx, u_BD, ubar_FD, W_DF, pairs, weight_n):
        ubar_FD = ubar_FD.contiguous()
        W_FD = W_DF.T.contiguous()
        W2_FD = W_FD * W_FD
        M_FD = ubar_FD * W2_FD  # ū_jd w_dj²
        num_n = pairs.sample(u_BD, M_FD.T)  # Σ_d u_bd ū_jd w_dj²
        nb_n = pairs.sample(u_BD * u_BD, W2_FD.T)  # |u_b ⊙ w_j|²
        nh_F = (ubar_FD * M_FD).sum(1)  # |ū_j ⊙ w_j|²
        den_n = torch.sqrt(nb_n * nh_F[pairs.f])
        ok_n = den_n > 1e-20
        cos_n = torch.where(ok_n, num_n / den_n.clamp_min(1e-20), torch.zeros_like(num_n)) * weight_n
        ctx.pairs = pairs
        ctx.save_for_backward(u_BD, ubar_FD, W_FD, W2_FD, M_FD, cos_n, nb_n.clamp_min(1e-30),
                              den_n.clamp_min(1e-20), nh_F, ok_n.to(u_BD.dtype) * weight_n)
        return (weight_n.sum() - cos_n.sum()).to(u_BD.dtype)

    @staticmethod
    def backward(ctx, g):
        pairs = ctx.pairs
        u_BD, ubar_FD, W_FD, W2_FD, M_FD, cos_n, nb_n, den_n, nh_F, w_n = ctx.saved_tensors
        F = W_FD.shape[0]
        g1_n = -g * w_n / den_n  # dL/dnum
        g2_n = g * cos_n / (2 * nb_n)  # dL/dnb (cos_n already carries the weight)
        g3_F = torch.zeros(F, dtype=u_BD.dtype, device=u_BD.device).index_add_(0, pairs.f, cos_n)
        g3_F = (g3_F * g / (2 * nh_F.clamp_min(1e-30)))[:, None]  # dL/dnh
        dM_FD = pairs.tmm(g1_n, u_BD)  # G1^T u
        dW2a_FD = pairs.tmm(g2_n, u_BD * u_BD)  # G2^T u²
        du_BD = dubar_FD = None
        if ctx.needs_input_grad[0]:  # the trainer detaches u and ū (see train_step): then skipped
            du_BD = pairs.mm(g1_n, M_FD) + 2 * u_BD * pairs.mm(g2_n, W2_FD)
        # num = Σ u ū w², nb = Σ u² w², nh = Σ ū² w²:
        #   dL/dū = w² (dM + 2 g3 ū);  dL/dw² = ū dM + dW2a + g3 ū²;  dL/dw = 2 w dL/dw²
        t_FD = torch.addcmul(dM_FD, ubar_FD, g3_F)  # dM + g3 ū
        if ctx.needs_input_grad[1]:
            dubar_FD = W2_FD * (t_FD + g3_F * ubar_FD)
        dW_FD = 2 * W_FD * torch.addcmul(dW2a_FD, ubar_FD, t_FD)
        return du_BD, dubar_FD, dW_FD.T, None, None


def ln_loss_pairs(u_BD: torch.Tensor, ubar_FD: torch.Tensor, W_enc_DF: torch.Tensor, pairs: ActivePairs,
                  weight_n: torch.Tensor | None = None) -> torch.Tensor:
    """L_N over given pairs (weight 0 drops a pair, e.g. a feature with no lookup entry yet)."""
    if weight_n is None:
        weight_n = torch.ones(pairs.n, dtype=u_BD.dtype, device=u_BD.device)
    return _LNLoss.apply(u_BD, ubar_FD, W_enc_DF, pairs, weight_n.to(u_BD.dtype))


def ln_loss(u_BD: torch.Tensor, ubar_FD: torch.Tensor, W_enc_DF: torch.Tensor, mask_BF: torch.Tensor) -> torch.Tensor:
    """L_N summed over the batch and the features active in `mask_BF` (see the module docstring)."""
    return ln_loss_pairs(u_BD, ubar_FD, W_enc_DF, ActivePairs(mask_BF))


def ln_loss_reference(u_BD, ubar_FD, W_enc_DF, mask_BF) -> torch.Tensor:
    """The same sum by a loop over (input, feature) pairs: the oracle for tests."""
    total = u_BD.new_zeros(())
    for b in range(u_BD.shape[0]):
        for j in range(ubar_FD.shape[0]):
            if mask_BF[b, j]:
                w = W_enc_DF[:, j]
                total = total + 1 - torch.cosine_similarity(ubar_FD[j] * w, u_BD[b] * w, dim=0, eps=1e-30)
    return total


@dataclass
class LNLookup:
    """h̄: per-feature average of the raw inputs that activated each feature (a detached buffer)."""

    mean_FD: torch.Tensor
    count_F: torch.Tensor  # activating inputs seen (float64)
    momentum: float = 0.9
    rule: str = "ema"

    @classmethod
    def empty(cls, d_sae: int, d_in: int, momentum: float = 0.9, rule: str = "ema", device="cpu") -> LNLookup:
        return cls(torch.zeros(d_sae, d_in, device=device), torch.zeros(d_sae, dtype=torch.float64, device=device),
                   momentum, rule)

    @property
    def valid_F(self) -> torch.Tensor:
        return self.count_F > 0

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, active: torch.Tensor | ActivePairs) -> None:
        """Fold in one batch: per feature, the mean of the inputs in the batch that activated it
        (`active`: a [B, F] mask or its ActivePairs). First activation: that mean; then
        h̄ <- h̄ + w (batch mean - h̄) with w = 1 - momentum (ema) or n_batch / n_total (mean)."""
        pairs = active if isinstance(active, ActivePairs) else ActivePairs(active)
        F = self.mean_FD.shape[0]
        n_F = torch.bincount(pairs.f, minlength=F).to(self.count_F.dtype)
        sum_FD = pairs.tmm(torch.ones(pairs.n, dtype=x_BD.dtype, device=x_BD.device), x_BD)
        if self.rule == "ema":
            w_F = torch.where(self.count_F == 0, 1.0, 1.0 - self.momentum)
        else:
            w_F = n_F / (self.count_F + n_F).clamp_min(1)
        w_F = torch.where(n_F > 0, w_F, 0.0)
        # mean <- mean + w (sum / n - mean), in one pass over [F, D]
        scale_F = (w_F / n_F.clamp_min(1)).to(self.mean_FD.dtype)[:, None]
        self.mean_FD.mul_(1 - w_F.to(self.mean_FD.dtype)[:, None]).add_(sum_FD.to(self.mean_FD.dtype) * scale_F)
        self.count_F += n_F

    def reset(self, features: torch.Tensor) -> None:
        self.mean_FD[features] = 0
        self.count_F[features] = 0


# --- training ---------------------------------------------------------------------------------

def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, constant, then a linear decay to 0 over the last 20%."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_from = int(0.8 * steps)
    if step >= decay_from and steps > decay_from:
        return max(0.0, (steps - step) / (steps - decay_from))
    return 1.0


@dataclass
class TrainState:
    """What a training run leaves besides the weights."""

    scale: float
    history: list[dict] = field(default_factory=list)
    resampled: list[int] = field(default_factory=list)  # features resampled at each resample step
    last_l_n: float | None = None
    lookup: LNLookup | None = None


def input_scale(sample_ND: torch.Tensor) -> float:
    """s such that E||s x||² = d_in on the sample."""
    ms = float((sample_ND.double() ** 2).sum(dim=1).mean())
    return math.sqrt(sample_ND.shape[1] / ms) if ms > 0 else 1.0


def sae_loss(sae: SparseAutoencoder, x_BD: torch.Tensor, l1: float) -> tuple[torch.Tensor, dict, tuple]:
    """MSE (summed over d_in, mean over the batch) + l1 · Σ_j f_j (TopK: no L1).
    Returns (loss, its parts, (u_BD, f_BF, pairs)) with u = x - b_dec (differentiable) and the active pairs."""
    f_BF, xhat_BD, pairs = sae.forward_train(x_BD)
    mse = (xhat_BD - x_BD).pow(2).sum(dim=1).mean()
    loss = mse
    parts = {"mse": mse.detach()}
    if sae.architecture == "standard" and l1 > 0:
        sparsity = f_BF.sum(dim=1).mean()  # decoder rows have unit norm
        loss = loss + l1 * sparsity
        parts["l1"] = sparsity.detach()
    return loss, parts, (x_BD - sae.b_dec, f_BF, pairs)


@torch.no_grad()
def resample_dead(sae: SparseAutoencoder, opt: torch.optim.Adam, dead_F: torch.Tensor, x_ND: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    """Towards Monosemanticity's resampling of the features in `dead_F` (bool [F]), in place, from
    inputs x_ND drawn with probability ∝ squared reconstruction loss. Returns the feature indices."""
    dead = dead_F.nonzero().squeeze(1)
    if dead.numel() == 0:
        return dead
    _, _, xhat = sae(x_ND)
    loss_N = (xhat - x_ND).pow(2).sum(dim=1).double()
    p = loss_N.pow(2)
    if not torch.isfinite(p).all() or p.sum() <= 0:
        p = torch.ones_like(p)
    pick = torch.multinomial((p / p.sum()).cpu(), dead.numel(), replacement=dead.numel() > len(p), generator=gen)
    u_KD = x_ND[pick.to(x_ND.device)] - sae.b_dec
    dirs_KD = u_KD / u_KD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead_F
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[dead] = dirs_KD
    sae.W_enc[:, dead] = (dirs_KD * 0.2 * enc_norm).T
    sae.b_enc[dead] = 0.0
    for p_, sel in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        st = opt.state.get(p_, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][sel] = 0.0
    return dead


SMALL_STEP_FLOPS = 1 << 28  # below this many multiply-adds per product, train on one CPU thread


@contextlib.contextmanager
def cpu_threads_for(flops: int, device: str):
    """One torch thread for small products on CPU: with two, small ops ran up to 10x slower on our
    shared 2-core machines (thread hand-offs dominate); big products keep every thread."""
    if device != "cpu" or flops >= SMALL_STEP_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_sae(batches: Iterator[torch.Tensor], d_in: int, settings: SAETrainSettings, device: str = "cpu",
              progress: Callable[[int, dict], None] | None = None, log_every: int = 50) -> tuple[SparseAutoencoder, TrainState]:
    """Train on raw-scale batches [batch_size, d_in] (an endless iterator). Returns the SAE (training
    scale) and its TrainState (with the scale to fold)."""
    flops = settings.batch_size * d_in * settings.d_sae(d_in)
    with cpu_threads_for(flops, str(device)):
        return _train_sae(batches, d_in, settings, device, progress, log_every)


def train_step(sae: SparseAutoencoder, opt: torch.optim.Optimizer, x_BD: torch.Tensor, s: SAETrainSettings,
               step: int, lookup: LNLookup | None = None) -> tuple[torch.Tensor, dict, ActivePairs]:
    """One optimiser step on a training-scale batch: learning-rate schedule, MSE + L1 (+ L_N from
    `ln_start` on, against the lookup of earlier batches), gradient with W_dec's parallel part
    removed, Adam, decoder rows renormalised, then the lookup folds in this batch.
    Returns (loss, its parts, the active pairs)."""
    for group in opt.param_groups:
        group["lr"] = s.lr * lr_factor(step, s.steps, s.warmup_steps)
    loss, parts, (_, _, pairs) = sae_loss(sae, x_BD, s.l1)
    if lookup is not None and step >= s.ln_start and bool(lookup.valid_F.any()):
        b_dec = sae.b_dec.detach()  # L_N shapes the encoder columns only (see the module docstring)
        l_n = ln_loss_pairs(x_BD - b_dec, lookup.mean_FD - b_dec, sae.W_enc, pairs, lookup.valid_F[pairs.f])
        loss = loss + s.ln_coef * l_n
        parts["l_n"] = l_n.detach()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_grad()
    opt.step()
    sae.normalize_decoder()
    if lookup is not None:
        lookup.update(x_BD, pairs)
    return loss.detach(), parts, pairs


def _train_sae(batches, d_in, settings, device, progress, log_every):
    s = settings
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    first = next(batches).to(device).float()
    scale = input_scale(first)
    sae = SparseAutoencoder(d_in, s.d_sae(d_in), s.architecture, s.topk, s.seed, device)
    with torch.no_grad():
        sae.b_dec.copy_((first * scale).mean(dim=0))
    opt = torch.optim.Adam(sae.parameters(), lr=s.lr, betas=(0.9, 0.999))
    use_ln = s.ln_coef > 0
    lookup = LNLookup.empty(sae.d_sae, d_in, s.ln_momentum, s.ln_update, device) if use_ln else None
    state = TrainState(scale=scale, lookup=lookup)
    fired_F = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    resample_at = set(s.resample_steps)
    pending = first
    for step in range(s.steps):
        x_BD = (pending if pending is not None else next(batches)).to(device).float() * scale
        pending = None
        loss, parts, pairs = train_step(sae, opt, x_BD, s, step, lookup)
        fired_F[pairs.f] = True
        if step + 1 in resample_at:
            sample = torch.cat([next(batches).to(device).float() for _ in range(max(1, 16384 // len(x_BD)))]) * scale
            revived = resample_dead(sae, opt, ~fired_F, sample, gen)
            if use_ln:
                lookup.reset(revived)
            state.resampled.append(int(revived.numel()))
            fired_F.zero_()
        if step % log_every == 0 or step == s.steps - 1:
            if "l_n" in parts:
                state.last_l_n = float(parts["l_n"])
            rec = {"step": step, "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()},
                   "l0": pairs.n / len(x_BD)}
            state.history.append(rec)
            if progress is not None:
                progress(step, rec)
        elif progress is not None:
            progress(step, {})
    return sae, state


# --- evaluation on cached activations ---------------------------------------------------------

@torch.no_grad()
def reconstruction_metrics(weights: SAEWeights, batches: Callable[[], Iterator[torch.Tensor]],
                           device: str = "cpu") -> dict:
    """explained_variance, mse (per element), l0, dead_fraction, dense_fraction and l_n of saved
    weights over held-out activations. `batches()` yields the same rows each call (two passes: the
    first builds h̄ from these rows, the second measures L_N against it).

    l_n here is the mean over active (input, feature) pairs of 1 - cos(h̄_j ⊙ w_j, u_b ⊙ w_j), with h̄_j
    the mean of the held-out inputs that activate j: comparable between SAEs trained with or without L_N.
    """
    W = SAEWeights(**{k: getattr(weights, k).to(device) if isinstance(getattr(weights, k), torch.Tensor) else getattr(weights, k)
                      for k in ("W_enc", "b_enc", "W_dec", "b_dec", "cfg", "threshold")})
    F = W.d_sae
    n = 0
    sq_err = sum_x2 = l0 = 0.0
    sum_xD = torch.zeros(W.d_in, dtype=torch.float64, device=device)
    fires_F = torch.zeros(F, dtype=torch.float64, device=device)
    lookup = LNLookup.empty(F, W.d_in, rule="mean", device=device)
    for x_BD in batches():
        x_BD = x_BD.to(device).float()
        f_BF = W.encode(x_BD)
        xhat_BD = W.decode(f_BF)
        active_BF = f_BF > 0
        n += len(x_BD)
        sq_err += float((xhat_BD - x_BD).double().pow(2).sum())
        sum_xD += x_BD.double().sum(dim=0)
        sum_x2 += float(x_BD.double().pow(2).sum())
        l0 += float(active_BF.sum())
        fires_F += active_BF.sum(dim=0).double()
        lookup.update(x_BD, active_BF)
    total_var = sum_x2 - float((sum_xD ** 2).sum()) / n
    ln_sum = pairs = 0.0
    for x_BD in batches():
        x_BD = x_BD.to(device).float()
        active_BF = W.encode(x_BD) > 0
        ln_sum += float(ln_loss(W.encoder_input(x_BD), W.encoder_input(lookup.mean_FD), W.W_enc, active_BF))
        pairs += float(active_BF.sum())
    freq_F = fires_F / n
    return {
        "n_tokens": n,
        "d_in": W.d_in,
        "d_sae": F,
        "mse": sq_err / (n * W.d_in),
        "explained_variance": 1.0 - sq_err / total_var if total_var > 0 else float("nan"),
        "l0": l0 / n,
        "dead_fraction": float((fires_F == 0).double().mean()),
        "dense_fraction": float((freq_F > DENSE_THRESHOLD).double().mean()),
        "l_n": ln_sum / pairs if pairs else float("nan"),
    }
