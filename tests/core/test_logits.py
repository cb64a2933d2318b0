"""Logit effects (core.logits): the top and bottom tokens of rows @ W_U against a NumPy argsort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import neuron_embeddings.core.logits as logits_mod
from neuron_embeddings.core.logits import bf16_screen, finite_columns, logit_effects, to_vocab


def _brute(rows: np.ndarray, w_u: np.ndarray, k: int) -> dict[str, np.ndarray]:
    valid = np.flatnonzero(np.isfinite(w_u).all(0))
    v = rows.astype(np.float64) @ w_u[:, valid].astype(np.float64)
    top, bottom = np.argsort(-v, axis=1, kind="stable")[:, :k], np.argsort(v, axis=1, kind="stable")[:, :k]
    return {"top_tokens": valid[top], "top_values": np.take_along_axis(v, top, 1),
            "bottom_tokens": valid[bottom], "bottom_values": np.take_along_axis(v, bottom, 1)}


SELECTION = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]  # the CPU's and other devices'
needs_screen = pytest.mark.skipif(bf16_screen(torch.ones(4, 4)) is None, reason="no native bfloat16 products here")


@pytest.mark.parametrize("compiled", SELECTION)
@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_top_and_bottom_tokens_are_the_argsort_for_any_chunk(chunk, compiled):
    rng = np.random.default_rng(0)
    rows, w_u = rng.normal(size=(13, 16)).astype(np.float32), rng.normal(size=(16, 300)).astype(np.float32)
    w_u[:, [5, 200]] = np.nan  # tokens the model has no column for: never ranked
    got = logit_effects(torch.from_numpy(rows), torch.from_numpy(w_u), k=10, chunk=chunk, compiled=compiled)
    want = _brute(rows, w_u, 10)
    for name in ("top_tokens", "bottom_tokens"):
        assert got[name].dtype == np.int32 and np.array_equal(got[name], want[name]), name
        assert not np.isin(got[name], [5, 200]).any()
    for name in ("top_values", "bottom_values"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiled", SELECTION)
def test_fewer_tokens_than_ranks_are_padded(compiled):
    got = logit_effects(torch.ones(2, 3), torch.tensor([[1.0, 2.0, float("nan")]] * 3), k=4, compiled=compiled)
    assert got["top_tokens"].tolist() == [[1, 0, -1, -1]] * 2 and got["bottom_tokens"].tolist() == [[0, 1, -1, -1]] * 2
    assert np.isnan(got["top_values"][:, 2:]).all() and got["top_values"][0, :2].tolist() == [6.0, 3.0]


@pytest.mark.parametrize("compiled", SELECTION)
def test_finite_columns_given_once_equal_finding_them_per_call(compiled):
    """The stage finds W_U's finite columns once per process and passes them with their ids."""
    rng = np.random.default_rng(1)
    rows, w_u = torch.from_numpy(rng.normal(size=(5, 8)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(8, 50)).astype(np.float32))
    w_u[:, [0, 17, 49]] = float("nan")
    kept, ids = finite_columns(w_u)
    assert kept.shape == (8, 47) and not np.isin(ids.numpy(), [0, 17, 49]).any()
    once, per_call = (logit_effects(rows, kept, 4, 16, ids_V=ids, compiled=compiled),
                      logit_effects(rows, w_u, 4, 16, compiled=compiled))
    for name in once:
        np.testing.assert_array_equal(once[name], per_call[name])


def test_to_vocab_drops_padding_and_marks_missing_tokens():
    w = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_vocab(w, 2), w[:, :2])
    wide = to_vocab(w, 5)
    assert torch.equal(wide[:, :3], w) and torch.isnan(wide[:, 3:]).all()


def _hard_unembedding(seed: int = 0, d: int = 96, v: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Rows and a W_U whose scores crowd near each row's 10th: duplicated columns (exact ties),
    columns a hair apart (closer than bfloat16 resolves), zero and tiny rows, and a NaN column."""
    rng = np.random.default_rng(seed)
    w_u = rng.normal(size=(d, v)).astype(np.float32)
    w_u[:, 100:110] = w_u[:, [7]]  # ties with token 7, broken by token id
    w_u[:, 200:220] = w_u[:, [11]] * (1 + np.arange(1, 21, dtype=np.float32) * 2e-7)
    w_u[:, 5] = np.nan
    rows = rng.normal(size=(40, d)).astype(np.float32)
    rows[:8] = w_u[:, [7, 11, 7, 11, 300, 301, 302, 303]].T  # rows that pick out the crowded columns
    rows[8] = 0.0
    rows[9] *= 1e-30
    return rows, w_u


@needs_screen
@pytest.mark.parametrize("chunk", [64, 1000, 16384])
def test_the_bfloat16_screen_ranks_as_float64_products_do(chunk):
    """The screened path (the CPU's default in the stage) gives each row's k largest and smallest
    float64 products, ties by token id, whatever the chunking."""
    rows, w_u = _hard_unembedding()
    kept, ids = finite_columns(torch.from_numpy(w_u))
    screen = bf16_screen(kept)
    got = logit_effects(torch.from_numpy(rows), kept, 10, chunk, ids_V=ids, screen=screen)
    want = _brute(rows, w_u, 10)
    for name in ("top_tokens", "bottom_tokens"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("top_values", "bottom_values"):
        np.testing.assert_allclose(got[name], want[name], rtol=3e-7, atol=1e-36, err_msg=name)  # float64, rounded
    assert (got["top_tokens"][8] == np.arange(10) + (np.arange(10) >= 5)).all()  # a zero row: all tie at 0


@needs_screen
def test_rows_whose_candidates_overflow_are_rescored_over_every_column(monkeypatch):
    rows, w_u = _hard_unembedding(seed=1)
    kept, ids = finite_columns(torch.from_numpy(w_u))
    screen = bf16_screen(kept)
    want = logit_effects(torch.from_numpy(rows), kept, 10, ids_V=ids, screen=screen)
    monkeypatch.setattr(logits_mod, "SCREEN_CANDIDATES", 12)  # most rows overflow
    got = logit_effects(torch.from_numpy(rows), kept, 10, ids_V=ids, screen=screen)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@needs_screen
def test_the_screens_bound_holds_on_every_product():
    """The bound the screen prunes with (core.logits.Screen) against the float64 products."""
    rng = np.random.default_rng(2)
    w_u = torch.from_numpy((rng.normal(size=(256, 4096)) * rng.lognormal(size=4096)).astype(np.float32))
    rows = torch.from_numpy((rng.normal(size=(64, 256)) * rng.lognormal(size=(64, 1))).astype(np.float32))
    screen = bf16_screen(w_u)
    s = (rows.bfloat16() @ screen.hi_DV).double()
    w_hi = rows.bfloat16().double()
    a = torch.linalg.vector_norm(w_hi, dim=1, keepdim=True)
    c = torch.linalg.vector_norm(rows.double() - w_hi, dim=1, keepdim=True)
    bound = a * torch.from_numpy(screen.p_V) + c * torch.from_numpy(screen.n_V) + logits_mod.SCREEN_REL * s.abs()
    err = (rows.double() @ w_u.double() - s).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.05  # and it is not vacuous: some products come near it
