"""A toy model of superposition (Elhage et al. 2022) with a layer of ReLU neurons, and its ground truth.

Data: ``n_features`` sparse features; feature i is active with probability ``p_active`` and then
takes a magnitude ``scale_i * U(0, 1)`` (``scale_i = 1`` unless ``unequal_scales``).

Model (all weights trained jointly, importance-weighted MSE with importance ``decay**i``)::

    x_BD   = f_BF @ W_FD (+ N(0, noise^2) per coordinate)   # the "residual stream": MLP input, D < F
    pre_BM = x_BD @ W_in_DM + b_in_M                         # M neurons, M < F
    a_BM   = ReLU(pre_BM)
    fhat_BF = ReLU(a_BM @ W_out_MF + b_out_F)

so there are more features than dimensions (superposition in x) and than neurons (polysemantic
neurons). The neuron embedding of example b for neuron j is ``x_b * W_in[:, j]`` exactly as in a
transformer MLP, and everything about the features is known: feature i's direction in x is
``W_FD[i]``, and its contribution to neuron j's pre-activation is ``f_i * (W_FD[i] . W_in[:, j])``.

Ground truth used by the benchmark:

* the **true feature of an example** for neuron j is the active feature with the largest
  contribution to j's pre-activation (-1 when no feature contributes positively);
* the **features that drive neuron j** (from the weights alone): feature i on its own at full
  magnitude ``scale_i`` activates j to at least ``drive_fraction`` (default 0.5) of the largest such
  single-feature activation of j: ``ReLU(scale_i W_i . w_j + b_j) >= drive_fraction * max_i (...)``, > 0.

Hard variants: fewer dimensions per feature (``d_model`` small: directions shared more),
``unequal_scales`` (feature magnitudes spread over [0.25, 1]), ``noise`` on x, denser features.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ToyConfig:
    """Shape, data distribution and training of one toy model. Validates itself."""

    n_features: int = 80
    d_model: int = 20
    d_mlp: int = 40
    p_active: float = 0.01
    importance_decay: float = 0.97
    unequal_scales: bool = False
    noise: float = 0.0
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0
    drive_fraction: float = 0.5

    def __post_init__(self) -> None:
        if min(self.n_features, self.d_model, self.d_mlp, self.steps, self.batch_size) < 1:
            raise ValueError("n_features, d_model, d_mlp, steps and batch_size must be >= 1")
        if not 0 < self.p_active <= 1:
            raise ValueError(f"p_active must be in (0, 1], got {self.p_active}")
        if not 0 < self.importance_decay <= 1:
            raise ValueError(f"importance_decay must be in (0, 1], got {self.importance_decay}")
        if self.noise < 0 or not 0 < self.drive_fraction <= 1:
            raise ValueError("noise must be >= 0 and drive_fraction in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ToyModel:
    """Trained weights (float32 NumPy) and the data distribution they were trained on."""

    config: ToyConfig
    W_FD: np.ndarray  # [F, D] feature directions in x
    W_in_DM: np.ndarray  # [D, M] neuron input weights
    b_in_M: np.ndarray  # [M]
    W_out_MF: np.ndarray  # [M, F]
    b_out_F: np.ndarray  # [F]
    scale_F: np.ndarray  # [F] magnitude scale of each feature
    final_loss: float = float("nan")

    def x(self, f_BF: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """[B, D] MLP inputs of features f_BF (plus the configured noise when rng is given)."""
        x_BD = f_BF @ self.W_FD
        if rng is not None and self.config.noise > 0:
            x_BD = x_BD + self.config.noise * rng.standard_normal(x_BD.shape).astype(x_BD.dtype)
        return x_BD

    def pre(self, x_BD: np.ndarray) -> np.ndarray:
        """[B, M] neuron pre-activations."""
        return x_BD @ self.W_in_DM + self.b_in_M

    def read_FM(self) -> np.ndarray:
        """[F, M] W_i . w_j: how strongly neuron j reads feature i's direction (per unit of f_i)."""
        return self.W_FD @ self.W_in_DM

    def single_feature_acts_FM(self) -> np.ndarray:
        """[F, M] activation of each neuron when only feature i is active, at magnitude scale_i."""
        return np.maximum(self.scale_F[:, None] * self.read_FM() + self.b_in_M[None, :], 0.0)

    def drivers_FM(self) -> np.ndarray:
        """[F, M] bool: feature i drives neuron j (see the module docstring)."""
        g_FM = self.single_feature_acts_FM()
        top_M = g_FM.max(axis=0)
        return (g_FM > 0) & (g_FM >= self.config.drive_fraction * top_M[None, :])

    def n_drivers_M(self) -> np.ndarray:
        """[M] int: the true number of features of each neuron, from the weights."""
        return self.drivers_FM().sum(axis=0)


def feature_scales(cfg: ToyConfig) -> np.ndarray:
    """[F] magnitude scale per feature: all 1, or (unequal) spread over [0.25, 1] in a seeded order."""
    if not cfg.unequal_scales:
        return np.ones(cfg.n_features, dtype=np.float32)
    rng = np.random.default_rng(cfg.seed + 7919)
    return rng.permutation(np.geomspace(0.25, 1.0, cfg.n_features)).astype(np.float32)


def sample_features(cfg: ToyConfig, n: int, rng: np.random.Generator, scale_F: np.ndarray | None = None
                    ) -> np.ndarray:
    """[n, F] float32 sparse features: active w.p. p_active, magnitude scale_i * U(0, 1)."""
    scale_F = feature_scales(cfg) if scale_F is None else scale_F
    active_BF = rng.random((n, cfg.n_features)) < cfg.p_active
    mag_BF = rng.random((n, cfg.n_features)).astype(np.float32)
    return np.where(active_BF, mag_BF * scale_F[None, :], 0.0).astype(np.float32)


class _ToyNet(torch.nn.Module):
    def __init__(self, cfg: ToyConfig, gen: torch.Generator):
        super().__init__()
        F, D, M = cfg.n_features, cfg.d_model, cfg.d_mlp

        def init(*shape: int, fan_in: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) / fan_in ** 0.5)

        self.W_FD, self.W_in_DM, self.W_out_MF = init(F, D, fan_in=D), init(D, M, fan_in=D), init(M, F, fan_in=M)
        self.b_in_M = torch.nn.Parameter(torch.zeros(M))
        self.b_out_F = torch.nn.Parameter(torch.zeros(F))

    def forward(self, f_BF: torch.Tensor, noise_BD: torch.Tensor | None = None) -> torch.Tensor:
        x_BD = f_BF @ self.W_FD
        if noise_BD is not None:
            x_BD = x_BD + noise_BD
        a_BM = torch.relu(x_BD @ self.W_in_DM + self.b_in_M)
        return torch.relu(a_BM @ self.W_out_MF + self.b_out_F)


def train_toy_model(cfg: ToyConfig, progress=None) -> ToyModel:
    """Train the toy model of ``cfg`` (deterministic for a seed); ``progress(n_steps)`` after each chunk.

    Runs on one torch thread: the model is tiny, and small ops run several times slower on two.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ToyConfig, progress) -> ToyModel:
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = _ToyNet(cfg, gen)
    scale_F = feature_scales(cfg)
    importance_F = torch.as_tensor(cfg.importance_decay ** np.arange(cfg.n_features), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss = torch.tensor(float("nan"))
    chunk = 100
    for step in range(cfg.steps):
        f_BF = torch.from_numpy(sample_features(cfg, cfg.batch_size, rng, scale_F))
        noise_BD = None
        if cfg.noise > 0:
            noise_BD = cfg.noise * torch.randn(cfg.batch_size, cfg.d_model, generator=gen)
        loss = (importance_F * (f_BF - net(f_BF, noise_BD)) ** 2).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and ((step + 1) % chunk == 0 or step + 1 == cfg.steps):
            progress((step % chunk) + 1)
    as_np = lambda p: p.detach().numpy().astype(np.float32).copy()
    return ToyModel(cfg, as_np(net.W_FD), as_np(net.W_in_DM), as_np(net.b_in_M), as_np(net.W_out_MF),
                    as_np(net.b_out_F), scale_F, float(loss.detach()))


@functools.lru_cache(maxsize=32)
def cached_toy_model(cfg: ToyConfig) -> ToyModel:
    """``train_toy_model(cfg)``, trained once per process (the benchmark's sections share models)."""
    return train_toy_model(cfg)


@dataclass
class ToyData:
    """An evaluation set drawn from the toy model's distribution."""

    f_BF: np.ndarray  # [B, F] features
    x_BD: np.ndarray  # [B, D] MLP inputs (with noise if configured)
    act_BM: np.ndarray  # [B, M] neuron activations ReLU(pre)


def toy_dataset(model: ToyModel, n: int, seed: int) -> ToyData:
    """Draw ``n`` inputs and run the neuron layer on them."""
    rng = np.random.default_rng(seed)
    f_BF = sample_features(model.config, n, rng, model.scale_F)
    x_BD = model.x(f_BF, rng)
    return ToyData(f_BF, x_BD, np.maximum(model.pre(x_BD), 0.0))


def select_examples(act_BM: np.ndarray, k: int, band: float | None, seed: int) -> np.ndarray:
    """[M, k] int64 example indices per neuron (-1 where fewer), ordered by activation descending.

    ``band=None``: the k most active examples with activation > 0 (the tool's ``top``).
    ``band=F``: a seeded uniform sample of up to k examples whose activation >= F * the neuron's
    maximum (the tool's ``band:F``), then ordered by activation.
    """
    M = act_BM.shape[1]
    out_MK = np.full((M, k), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for j in range(M):
        a_B = act_BM[:, j]
        top = a_B.max()
        if top <= 0:
            continue
        eligible = np.flatnonzero(a_B > 0) if band is None else np.flatnonzero(a_B >= band * top)
        if band is None:
            chosen = eligible[np.argsort(-a_B[eligible], kind="stable")[:k]]
        else:
            chosen = rng.choice(eligible, size=min(k, len(eligible)), replace=False)
            chosen = chosen[np.argsort(-a_B[chosen], kind="stable")]
        out_MK[j, : len(chosen)] = chosen
    return out_MK


def dominant_feature(f_nF: np.ndarray, read_F: np.ndarray) -> np.ndarray:
    """[n] the active feature with the largest contribution f_i * read_i to one neuron; -1 if none > 0."""
    contrib_nF = f_nF * read_F[None, :]
    best_n = contrib_nF.argmax(axis=1)
    return np.where(contrib_nF.max(axis=1) > 0, best_n, -1)


def active_set_ids(f_nF: np.ndarray) -> np.ndarray:
    """[n] an id per distinct set of active features (the toy model's "token identity")."""
    _, ids = np.unique(f_nF > 0, axis=0, return_inverse=True)
    return ids.reshape(-1)


def toy_examples(model: ToyModel, data: ToyData, k: int, band: float | None, seed: int, name: str):
    """The ``NeuronExamples`` of every neuron of the toy model on ``data`` (see ``select_examples``)."""
    from neuron_embeddings.groundtruth.measures import NeuronExamples

    sel_MK = select_examples(data.act_BM, k, band, seed)
    M = sel_MK.shape[0]
    have_MK = sel_MK >= 0
    safe_MK = np.where(have_MK, sel_MK, 0)
    act_MK = np.where(have_MK, data.act_BM[safe_MK, np.arange(M)[:, None]], np.nan).astype(np.float32)
    x_MKD = np.where(have_MK[..., None], data.x_BD[safe_MK], 0.0).astype(np.float32)
    emb_MKD = x_MKD * model.W_in_DM.T[:, None, :]
    read_FM = model.read_FM()
    true_MK = np.full((M, k), -1, dtype=np.int64)
    input_MK = np.full((M, k), -1, dtype=np.int64)
    for j in range(M):
        idx = sel_MK[j][have_MK[j]]
        if len(idx):
            true_MK[j, : len(idx)] = dominant_feature(data.f_BF[idx], read_FM[:, j])
            input_MK[j, : len(idx)] = active_set_ids(data.f_BF[idx])
    return NeuronExamples(name, act_MK, emb_MKD, x_MKD, true_MK, input_MK, model.n_drivers_M().astype(np.int64),
                          dict(kind="toy", config=model.config.to_dict(), final_loss=model.final_loss))
