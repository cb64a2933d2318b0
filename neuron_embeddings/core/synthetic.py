"""Synthetic GPT-2 models for tests and benchmarks, built offline in seconds.

Two builders, both writing an ordinary Hugging Face model directory (``save_pretrained``
weights + config + a fast tokenizer), so the project's loading path
(``AutoTokenizer.from_pretrained`` + ``TransformerBridge.boot_transformers``) runs unchanged:

``build_random_gpt2``
    A GPT-2 with random weights and a byte-level BPE tokenizer trained on CPython's
    ``pydoc_data`` help text. Every LayerNorm gets a non-trivial gain (uniform 0.5-1.5)
    and bias (normal, std 0.1), so folding LayerNorm into ``W_in`` is really exercised.
    ``n_layer=12, n_embd=768, n_head=12, n_positions=1024`` gives a GPT-2-small-shaped
    model for benchmarks.

``build_planted_model``
    A GPT-2 whose layer-0 MLP neurons read *known* features, so the right clusters of
    neuron embeddings are known in advance (ground truth for tests and benchmarks):

    * Vocabulary: ``<|endoftext|>`` (id 0), then one group of words per feature
      (``fa0 fa1 ...`` for feature 0, ``fb0 ...`` for feature 1, ...), then filler words
      (``x0 x1 ...``). The tokenizer is a word-level model with a whitespace
      pre-tokenizer, so ``" ".join(words)`` tokenizes back to exactly those ids.
    * Residual-stream layout: the first ``n_features * block`` coordinates are cut into
      one block per feature; the remaining "reserved" coordinates hold a constant
      direction ``v`` shared by all tokens and the filler directions. Feature ``f`` has a
      unit direction ``u_f`` of +-1/sqrt(block) entries on its own block (half of each
      sign, so it has zero mean and survives LayerNorm's centring). Supports are disjoint;
      with ``shared_directions = s > 0`` every ``u_f`` is mixed with one common direction
      so that ``u_f . u_g = s`` for ``f != g`` (a harder variant, with no guarantees).
    * Token embeddings: token ``t`` of feature ``f`` is ``c_t u_f + v + n_t`` with
      strengths ``c_t`` evenly spread over [1, 3] inside each feature (the same values in
      every feature). ``v`` keeps the strength visible after LayerNorm, whose output is
      ``sqrt(d_model) x / |x|`` for a zero-mean ``x``. Fillers and ``<|endoftext|>`` are
      ``v + n_t`` plus a random direction inside the reserved block. The noise ``n_t`` has
      norm exactly ``noise``, lives on the feature blocks, has zero mean and is orthogonal
      to every ``u_f``: it tilts the neuron embeddings (so they are not exactly parallel)
      but never changes which neurons fire.
    * Position embeddings: ``beta_p v`` with ``beta_p ~ U(-position_jitter, +position_jitter)``.
      They only rescale ``v``, so a token's activation varies a little from position to
      position (different occurrences of a token, and different tokens, win different
      sequences; the top examples of a multi-feature neuron mix all its features) while
      the neuron embeddings' directions do not depend on position.
    * Attention writes exactly 0 (``attn.c_proj`` weight and bias are 0) and so does the
      MLP (``mlp.c_proj`` = 0), so the residual stream is token + position embedding at
      every layer and the MLP input of every layer is LayerNorm(that sum).
    * MLP input weights, as seen *after* LayerNorm folding (``W_in``, ``b_in``): a planted
      neuron ``j`` reading features ``F_j`` has ``W_in[:, j] = a_j / sqrt(d_model) *
      sum_{f in F_j} u_f`` with ``a_j ~ U(3, 5)`` (the same for all of its features, so
      its features tie and all show up in its top examples) and ``b_in[j] = -1``. About a
      quarter of the neurons are unused: small random zero-mean weights and bias -1, so
      they never fire. Planted neurons read 1, 2 or 3 features (cycling), at random
      positions. The stored ``ln_2`` gain and bias are random and non-trivial and the
      stored ``c_fc`` weight/bias are divided/shifted to compensate, so the folded
      ``W_in``/``b_in`` are exactly the ones above. With ``n_layer > 1`` every layer
      carries the same planting (same neurons, same folded weights; own random ``ln_2``).

    Consequences (at ``shared_directions=0``): a token of feature ``f`` at position ``p``
    gives pre-activation ``a_j c_t / sqrt(c_t^2 + (1 + beta_p)^2 + noise^2) - 1`` (> 0.8 for
    the defaults) at neurons reading ``f`` and -1 (up to float rounding) at the other
    planted neurons; fillers give -1 at every planted neuron, and unused neurons stay near
    -1. Activations depend on the token and its position only, never on the context. The
    neuron embedding ``e = x * W_in[:, j]`` of a feature-``f`` token is ``f``'s block of
    ``u_f * u_f`` (a constant there) plus the noise's small share on the blocks ``j`` reads,
    so for a multi-feature neuron the embeddings of different features are nearly
    orthogonal (cosine distance ~1) and those of one feature nearly parallel (distance ~0):
    average-linkage clustering at threshold 0.5 recovers exactly the neuron's features.

    With ``gated=True`` the model is a Llama instead (gated, bias-free MLP, RMSNorm, no position
    embeddings; attention and MLP outputs are 0 as above, and each ``post_attention_layernorm`` gain
    is random and compensated in ``gate_proj``/``up_proj``, so the folded weights are exact). A
    planted neuron reads its features ``sum_f u_f`` (scaled as above) through the gate
    (``W_gate``), the linear path (``W_in``) or both, in a seeded cycle over the planted neurons
    (``PlantedTruth.neuron_paths``); a path that reads no feature reads ``v`` with the same norm, so
    it passes every token alike (an open gate, or a plain positive scale). Activations of other
    tokens are 0 (no biases). The neuron embedding ``[x * W_gate ; x * W_in]`` then has one half
    that tells the features apart and, for single-path neurons, one half shared by all examples.

``write_planted_corpus`` writes a matching text corpus (documents of random vocabulary
words separated by blank lines), and ``PlantedTruth`` (saved as ``planted.json`` next to
the model) records which tokens carry which feature and which neurons read which features.
With the default model and corpus (400 documents of 16 words), the 20 documents with the
highest activation of a planted neuron contain every feature it reads (checked for seeds
0-7); with only the top 10, a three-feature neuron now and then misses one feature, so a
ground-truth comparison on few examples should expect only the features that occur in them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"
PLANTED_JSON = "planted.json"

_LN_GAIN_RANGE = (0.5, 1.5)
_LN_BIAS_STD = 0.1
_STRENGTH_RANGE = (1.0, 3.0)
_NEURON_GAIN_RANGE = (3.0, 5.0)
_NEURON_BIAS = -1.0
_FILLER_SCALE = 0.5


# --------------------------------------------------------------------------- random GPT-2


def build_random_gpt2(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    vocab_size: int = 1000,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised GPT-2 and a trained byte-level BPE tokenizer to ``out_dir``.

    Every LayerNorm (``ln_1``, ``ln_2``, ``ln_f``) gets gain ~ U(0.5, 1.5) and bias ~ N(0, 0.1).
    The model's vocabulary is the tokenizer's (``vocab_size`` unless the training text runs
    out of merges). Deterministic for a given seed. Returns the directory.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _wrap_tokenizer(train_bpe_tokenizer(vocab_size), n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    _randomize_layernorms(model, torch.Generator().manual_seed(seed + 1))
    with _no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


ARCHITECTURES = ("llama", "qwen2", "gemma", "gpt_neox", "opt")


def build_random_model(out_dir: str | Path, architecture: str, *, n_layer: int = 2, d_model: int = 64,
                       d_mlp: int = 128, n_head: int = 4, n_positions: int = 128, vocab_size: int = 600,
                       seed: int = 0) -> Path:
    """Save a small randomly initialised model of a Hugging Face architecture users bring (Llama:
    grouped-query attention, no biases; Qwen2: biases on q/k/v; Gemma: GeGLU, RMSNorm scaled by
    1 + weight, scaled embeddings; GPT-NeoX: parallel attention and MLP; OPT: ReLU MLP whose width
    TransformerLens' config misreports) with a trained BPE
    tokenizer. Norm gains are randomised so that folding them into W_in matters. Returns the directory."""
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _wrap_tokenizer(train_bpe_tokenizer(vocab_size), n_positions)
    common = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layer,
                  num_attention_heads=n_head, max_position_embeddings=n_positions,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config, cls = {
        "llama": lambda: (transformers.LlamaConfig(**common, num_key_value_heads=max(1, n_head // 2)),
                          transformers.LlamaForCausalLM),
        "qwen2": lambda: (transformers.Qwen2Config(**common, num_key_value_heads=max(1, n_head // 2)),
                          transformers.Qwen2ForCausalLM),
        "gemma": lambda: (transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=d_model // n_head,
                                                   hidden_activation="gelu_pytorch_tanh"),
                          transformers.GemmaForCausalLM),
        "gpt_neox": lambda: (transformers.GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.25),
                             transformers.GPTNeoXForCausalLM),
        "opt": lambda: (transformers.OPTConfig(**common, ffn_dim=d_mlp, word_embed_proj_dim=d_model),
                        transformers.OPTForCausalLM),
    }[architecture]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(_uniform(p.shape, (0.5, 1.5) if architecture != "gemma" else (-0.5, 0.5), gen))
            elif p.ndim == 1 and name.endswith("bias"):  # non-zero biases, so that the identities test them
                p.copy_(_uniform(p.shape, (-0.1, 0.1), gen))
    with _no_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_bpe_tokenizer(vocab_size: int = 1000):
    """Train a GPT-2-style byte-level BPE (``tokenizers.Tokenizer``) on CPython's pydoc topics.

    ``<|endoftext|>`` is the only special token (id 0); no prefix space is added.
    """
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + {EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [topics[key] for key in sorted(topics)]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _wrap_tokenizer(tok, model_max_length: int):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with EOS as bos/eos/unk."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=model_max_length,
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars (e.g. "Writing model shards") for the block."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


@torch.no_grad()
def _randomize_layernorms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give every LayerNorm a non-trivial gain ~ U(0.5, 1.5) and bias ~ N(0, 0.1), in place."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.copy_(_uniform(module.weight.shape, _LN_GAIN_RANGE, gen))
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * _LN_BIAS_STD)


def _uniform(shape: tuple[int, ...] | torch.Size, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=gen)


# --------------------------------------------------------------------------- planted truth


@dataclass
class PlantedTruth:
    """What was planted in a ``build_planted_model`` model (saved as ``planted.json``).

    ``features[f]``: token ids carrying feature f. ``neuron_features[j]``: features MLP neuron
    j reads (the same in every layer); ``[]`` for unused neurons. ``words[i]``: the word of
    token id i. ``strengths[i]``: the strength c_t of token i in its feature direction
    (0 for fillers and ``<|endoftext|>``). ``n_layer``: layers carrying the planting.
    ``params``: the ``build_planted_model`` arguments that shaped the model. ``neuron_paths[j]``
    (gated models only): the path through which neuron j reads its features, ``"gate"``,
    ``"linear"`` or ``"both"`` (``""`` for unused neurons).
    """

    features: list[list[int]]
    neuron_features: list[list[int]]
    words: list[str]
    strengths: list[float] = field(default_factory=list)
    n_layer: int = 1
    params: dict[str, float] = field(default_factory=dict)
    neuron_paths: list[str] = field(default_factory=list)

    def token_feature(self) -> np.ndarray:
        """[vocab] int64: the feature index of each token id, -1 for none."""
        out = np.full(len(self.words), -1, dtype=np.int64)
        for f, ids in enumerate(self.features):
            out[ids] = f
        return out

    def n_clusters(self) -> np.ndarray:
        """[d_mlp] int64: how many features (true clusters) each neuron reads, 0 if unused."""
        return np.array([len(fs) for fs in self.neuron_features], dtype=np.int64)

    def neuron_token_clusters(self, neuron: int) -> list[list[int]]:
        """The true clusters of ``neuron`` as token-id groups: one per feature it reads."""
        return [list(self.features[f]) for f in self.neuron_features[neuron]]

    def to_json(self, path: str | Path) -> Path:
        """Write to ``path`` (a file, or a model directory -> ``planted.json`` in it)."""
        path = _truth_path(path)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> PlantedTruth:
        """Read from ``path`` (a file, or a model directory holding ``planted.json``)."""
        return cls(**json.loads(_truth_path(path).read_text()))


def _truth_path(path: str | Path) -> Path:
    path = Path(path)
    return path / PLANTED_JSON if path.is_dir() else path


# --------------------------------------------------------------------------- planted model


def build_planted_model(
    out_dir: str | Path,
    *,
    n_features: int = 6,
    tokens_per_feature: int = 8,
    n_filler: int = 8,
    d_model: int = 64,
    d_mlp: int = 32,
    n_layer: int = 1,
    seed: int = 0,
    noise: float = 0.05,
    shared_directions: float = 0.0,
    position_jitter: float = 0.3,
    n_head: int = 4,
    n_positions: int = 256,
    feature_scales: list[float] | None = None,
    gated: bool = False,
) -> PlantedTruth:
    """Save a GPT-2 with planted (poly)semantic MLP neurons to ``out_dir``; see the module doc.

    Writes the model, a word-level tokenizer and ``planted.json``; returns the truth.
    Deterministic for a given seed. ``feature_scales`` (one positive factor per feature, default
    all 1) multiplies the strengths c_t of each feature's tokens: unequal feature strengths.
    ``gated``: a Llama (gated, bias-free MLP, RMSNorm, no position embeddings) instead of a GPT-2,
    whose planted neurons read their features through the gate, the linear path or both (see the
    module doc).
    """
    _check_planted_args(n_features, tokens_per_feature, d_model, d_mlp, n_head, shared_directions,
                        position_jitter)
    rng = np.random.default_rng(seed)
    words, features = _planted_vocab(n_features, tokens_per_feature, n_filler)
    dirs, v, reserved = _feature_directions(n_features, d_model, shared_directions, rng)
    strengths = _token_strengths(len(words), features)
    if feature_scales is not None:
        if len(feature_scales) != n_features or min(feature_scales) <= 0:
            raise ValueError(f"feature_scales needs {n_features} positive factors, got {feature_scales}")
        for ids, scale in zip(features, feature_scales):
            strengths[ids] *= scale
    wte = _planted_embeddings(len(words), features, strengths, dirs, v, reserved, noise, rng)  # [vocab, d]
    wpe = _position_embeddings(n_positions, v, position_jitter, rng)  # [n_positions, d]
    neuron_features = _assign_neuron_features(n_features, d_mlp, rng)
    w_in, b_in = _planted_mlp_in(neuron_features, dirs, rng)  # [d, d_mlp], [d_mlp]
    neuron_paths: list[str] = []
    if gated:
        neuron_paths = _assign_paths(neuron_features, rng)
        w_gate, w_in = _gated_mlp_in(w_in, neuron_paths, v)  # [d, d_mlp] each
        model = _planted_llama(len(words), d_model, d_mlp, n_layer, n_head, n_positions)
        _write_planted_gated_weights(model, wte, w_gate, w_in, torch.Generator().manual_seed(seed + 1))
    else:
        model = _planted_gpt2(len(words), d_model, d_mlp, n_layer, n_head, n_positions)
        _write_planted_weights(model, wte, wpe, w_in, b_in, torch.Generator().manual_seed(seed + 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _no_progress_bars():
        model.save_pretrained(out)
    _wrap_tokenizer(_word_level_tokenizer(words), n_positions).save_pretrained(out)

    params = dict(n_features=n_features, tokens_per_feature=tokens_per_feature, n_filler=n_filler,
                  d_model=d_model, d_mlp=d_mlp, seed=seed, noise=noise,
                  shared_directions=shared_directions, position_jitter=position_jitter)
    if feature_scales is not None:
        params["feature_scales"] = [float(s) for s in feature_scales]
    if gated:
        params["gated"] = True
    truth = PlantedTruth(features=features, neuron_features=neuron_features, words=words,
                         strengths=[float(s) for s in strengths], n_layer=n_layer, params=params,
                         neuron_paths=neuron_paths)
    truth.to_json(out / PLANTED_JSON)
    return truth


def _check_planted_args(n_features: int, tokens_per_feature: int, d_model: int, d_mlp: int,
                        n_head: int, shared: float, jitter: float) -> None:
    if n_features < 1 or tokens_per_feature < 1 or d_mlp < 1:
        raise ValueError("n_features, tokens_per_feature and d_mlp must be >= 1")
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
    if _block_size(n_features, d_model) < 2:
        raise ValueError(f"d_model={d_model} is too small for {n_features} features "
                         f"(need >= {2 * n_features + _n_reserved(d_model)})")
    if not 0.0 <= shared < 1.0:
        raise ValueError(f"shared_directions must be in [0, 1), got {shared}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"position_jitter must be in [0, 1), got {jitter}")


def _n_reserved(d_model: int) -> int:
    """Coordinates kept for the constant direction v and the filler directions."""
    return max(4, d_model // 8)


def _block_size(n_features: int, d_model: int) -> int:
    """Even number of coordinates per feature block."""
    return (d_model - _n_reserved(d_model)) // n_features // 2 * 2


def _planted_vocab(n_features: int, tokens_per_feature: int, n_filler: int) -> tuple[list[str], list[list[int]]]:
    """Words (id -> word: EOS, feature groups, fillers) and feature -> token ids."""
    words = [EOS]
    features = []
    for f in range(n_features):
        features.append(list(range(len(words), len(words) + tokens_per_feature)))
        words += [f"f{_letters(f)}{i}" for i in range(tokens_per_feature)]
    words += [f"x{i}" for i in range(n_filler)]
    return words, features


def _letters(index: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'ba', ... (a distinct lowercase label per feature)."""
    out = ""
    while True:
        index, rest = divmod(index, 26)
        out = chr(ord("a") + rest) + out
        if index == 0:
            return out


def _feature_directions(n_features: int, d_model: int, shared: float, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit zero-mean feature directions [n_features, d], the constant direction v [d], reserved coords."""
    block = _block_size(n_features, d_model)
    dirs = np.zeros((n_features, d_model))
    for f in range(n_features):
        signs = rng.permutation(np.repeat([1.0, -1.0], block // 2))
        dirs[f, f * block:(f + 1) * block] = signs / math.sqrt(block)
    if shared > 0:
        common = _common_direction(dirs, n_features * block, rng)
        dirs = math.sqrt(1 - shared) * dirs + math.sqrt(shared) * common
    reserved = np.arange(n_features * block, d_model)
    v = _zero_mean_unit(reserved, d_model, rng)
    return dirs, v, reserved


def _common_direction(dirs: np.ndarray, n_feature_coords: int, rng: np.random.Generator) -> np.ndarray:
    """[d] unit, zero-mean direction on the feature coordinates orthogonal to every feature direction."""
    m = np.zeros(dirs.shape[1])
    m[:n_feature_coords] = rng.standard_normal(n_feature_coords)
    m[:n_feature_coords] -= m[:n_feature_coords].mean()
    m -= dirs.T @ (dirs @ m)
    return m / np.linalg.norm(m)


def _zero_mean_unit(coords: np.ndarray, d_model: int, rng: np.random.Generator) -> np.ndarray:
    """[d] random unit vector supported on ``coords`` with zero mean."""
    out = np.zeros(d_model)
    out[coords] = rng.standard_normal(len(coords))
    out[coords] -= out[coords].mean()
    return out / np.linalg.norm(out)


def _token_strengths(vocab: int, features: list[list[int]]) -> np.ndarray:
    """[vocab] strength c_t: evenly spread over [1, 3] within each feature, 0 for the rest."""
    out = np.zeros(vocab)
    for ids in features:
        out[ids] = np.linspace(*_STRENGTH_RANGE, len(ids)) if len(ids) > 1 else _STRENGTH_RANGE[1]
    return out


def _planted_embeddings(vocab: int, features: list[list[int]], strengths: np.ndarray, dirs: np.ndarray,
                        v: np.ndarray, reserved: np.ndarray, noise: float, rng: np.random.Generator
                        ) -> np.ndarray:
    """[vocab, d] token embeddings: c_t u_f + v + n_t for feature tokens, v + filler direction + n_t otherwise."""
    d_model = dirs.shape[1]
    wte = np.tile(v, (vocab, 1)) + _orthogonal_noise(vocab, dirs, reserved, noise, rng)
    token_feature = np.full(vocab, -1)
    for f, ids in enumerate(features):
        token_feature[ids] = f
    for t in range(vocab):
        if token_feature[t] >= 0:
            wte[t] += strengths[t] * dirs[token_feature[t]]
        else:
            wte[t] += _FILLER_SCALE * _zero_mean_unit(reserved, d_model, rng)
    return wte


def _orthogonal_noise(n: int, dirs: np.ndarray, reserved: np.ndarray, norm: float,
                      rng: np.random.Generator) -> np.ndarray:
    """[n, d] random rows of the given norm on the feature coordinates, zero-mean and orthogonal to all dirs."""
    noise = rng.standard_normal((n, dirs.shape[1]))
    noise[:, reserved] = 0.0
    feature_coords = np.setdiff1d(np.arange(dirs.shape[1]), reserved)
    noise[:, feature_coords] -= noise[:, feature_coords].mean(1, keepdims=True)
    q, _ = np.linalg.qr(dirs.T)  # [d, n_features] orthonormal basis of span(dirs); dirs are zero-mean
    noise -= (noise @ q) @ q.T
    lengths = np.linalg.norm(noise, axis=1, keepdims=True)  # 0 only if no such direction exists
    return np.divide(noise * norm, lengths, out=np.zeros_like(noise), where=lengths > 1e-9)


def _position_embeddings(n_positions: int, v: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """[n_positions, d] position embeddings beta_p v with beta_p ~ U(-jitter, jitter)."""
    return rng.uniform(-jitter, jitter, size=(n_positions, 1)) * v[None, :]


def _assign_neuron_features(n_features: int, d_mlp: int, rng: np.random.Generator) -> list[list[int]]:
    """Per neuron, the sorted features it reads: ~1/4 unused, the rest read 1, 2, 3, 1, 2, 3, ..."""
    n_planted = max(1, d_mlp - d_mlp // 4)
    planted = []
    for i in range(n_planted):
        k = min(i % 3 + 1, n_features)
        planted.append(sorted(int(f) for f in rng.choice(n_features, size=k, replace=False)))
    out: list[list[int]] = [[] for _ in range(d_mlp)]
    for j, fs in zip(rng.permutation(d_mlp)[:n_planted], planted):
        out[int(j)] = fs
    return out


def _planted_mlp_in(neuron_features: list[list[int]], dirs: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The LayerNorm-folded MLP input weights W_in [d, d_mlp] and bias b_in [d_mlp]."""
    d_model = dirs.shape[1]
    w_in = np.zeros((d_model, len(neuron_features)))
    for j, fs in enumerate(neuron_features):
        if fs:
            w_in[:, j] = rng.uniform(*_NEURON_GAIN_RANGE) / math.sqrt(d_model) * dirs[fs].sum(0)
        else:
            w = rng.standard_normal(d_model) * (0.1 / math.sqrt(d_model))
            w_in[:, j] = w - w.mean()
    return w_in, np.full(len(neuron_features), _NEURON_BIAS)


def _planted_gpt2(vocab: int, d_model: int, d_mlp: int, n_layer: int, n_head: int, n_positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d_model, n_layer=n_layer,
                        n_head=n_head, n_inner=d_mlp, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # attention/unused weights: fixed, irrelevant to the truth
        return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def _write_planted_weights(model, wte: np.ndarray, wpe: np.ndarray, w_in: np.ndarray, b_in: np.ndarray,
                           gen: torch.Generator) -> None:
    """Install embeddings, zero attention/MLP outputs and LN-compensated c_fc in every layer."""
    tr = model.transformer
    tr.wte.weight.copy_(torch.as_tensor(wte, dtype=torch.float32))
    tr.wpe.weight.copy_(torch.as_tensor(wpe, dtype=torch.float32))
    _randomize_layernorms(model, gen)
    w_true = torch.as_tensor(w_in, dtype=torch.float64)  # [d, d_mlp]
    b_true = torch.as_tensor(b_in, dtype=torch.float64)  # [d_mlp]
    for block in tr.h:
        block.attn.c_proj.weight.zero_()
        block.attn.c_proj.bias.zero_()
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
        gain = block.ln_2.weight.double()  # [d]
        bias = block.ln_2.bias.double()  # [d]
        w_hf = w_true / gain[:, None]  # folded: gain[:, None] * w_hf == w_true
        block.mlp.c_fc.weight.copy_(w_hf.float())
        block.mlp.c_fc.bias.copy_((b_true - bias @ w_hf).float())  # folded: b_hf + bias @ w_hf == b_true


GATED_PATHS = ("gate", "linear", "both")


def _assign_paths(neuron_features: list[list[int]], rng: np.random.Generator) -> list[str]:
    """Per neuron, the path its features go through: gate, linear, both, cycling in a seeded order
    over the planted neurons ("" for unused ones)."""
    planted = [j for j, fs in enumerate(neuron_features) if fs]
    out = [""] * len(neuron_features)
    for i, j in enumerate(rng.permutation(planted)):
        out[int(j)] = GATED_PATHS[i % len(GATED_PATHS)]
    return out


def _gated_mlp_in(w_feat: np.ndarray, paths: list[str], v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The RMSNorm-folded W_gate and W_in [d, d_mlp] of a gated planted model. A neuron reads its
    features (``w_feat``'s column) through the gate, the linear path or both; a path that reads no
    feature reads the constant direction ``v`` with the same norm (it passes every token alike:
    an open gate, or a linear factor that only scales)."""
    w_const = v[:, None] * np.linalg.norm(w_feat, axis=0, keepdims=True)  # [d, d_mlp]
    reads = np.array([p in ("gate", "both") for p in paths]), np.array([p in ("linear", "both") for p in paths])
    w_gate = np.where(reads[0][None, :], w_feat, w_const)
    w_in = np.where(reads[1][None, :], w_feat, w_const)
    unused = np.array([not p for p in paths])
    w_gate[:, unused], w_in[:, unused] = w_feat[:, unused], w_feat[:, unused]  # small random: never fire much
    return w_gate, w_in


def _planted_llama(vocab: int, d_model: int, d_mlp: int, n_layer: int, n_head: int, n_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layer,
                         num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=n_positions,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _write_planted_gated_weights(model, wte: np.ndarray, w_gate: np.ndarray, w_in: np.ndarray,
                                 gen: torch.Generator) -> None:
    """Install embeddings, zero attention/MLP outputs and gain-compensated gate/up projections."""
    model.model.embed_tokens.weight.copy_(torch.as_tensor(wte, dtype=torch.float32))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        gain = _uniform((w_in.shape[0],), _LN_GAIN_RANGE, gen).double()  # [d]
        layer.post_attention_layernorm.weight.copy_(gain.float())
        for proj, w_true in ((layer.mlp.gate_proj, w_gate), (layer.mlp.up_proj, w_in)):
            w_hf = torch.as_tensor(w_true, dtype=torch.float64) / gain[:, None]  # folded: gain * w_hf == w_true
            proj.weight.copy_(w_hf.T.float())


def _word_level_tokenizer(words: list[str]):
    """A ``tokenizers.Tokenizer``: whitespace-split words -> ids (unknown words -> EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([EOS])
    return tok


# --------------------------------------------------------------------------- planted corpus


def write_planted_corpus(
    path: str | Path,
    truth: PlantedTruth,
    *,
    n_docs: int = 400,
    doc_len: int = 16,
    seed: int = 0,
    p_feature: float = 0.5,
) -> Path:
    """Write ``n_docs`` documents of ``doc_len`` vocabulary words, separated by blank lines.

    Each word is independently a uniformly random feature token (probability ``p_feature``,
    or always when there are no fillers) or a uniformly random filler word. ``<|endoftext|>``
    is never written. Each document is one line. Returns the path.
    """
    rng = np.random.default_rng(seed)
    feature_ids = np.array([t for ids in truth.features for t in ids])
    filler_ids = np.array([t for t in np.flatnonzero(truth.token_feature() < 0) if truth.words[t] != EOS])
    docs = []
    for _ in range(n_docs):
        use_feature = rng.random(doc_len) < p_feature if len(filler_ids) else np.ones(doc_len, bool)
        ids = np.where(use_feature, rng.choice(feature_ids, doc_len),
                       rng.choice(filler_ids, doc_len) if len(filler_ids) else 0)
        docs.append(" ".join(truth.words[t] for t in ids))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n")
    return path
