"""Logit effects (core.logits): the top and bottom tokens of rows @ W_U against a NumPy argsort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_embeddings.core.logits import finite_columns, logit_effects, to_vocab


def _brute(rows: np.ndarray, w_u: np.ndarray, k: int) -> dict[str, np.ndarray]:
    valid = np.flatnonzero(np.isfinite(w_u).all(0))
    v = rows.astype(np.float64) @ w_u[:, valid].astype(np.float64)
    top, bottom = np.argsort(-v, axis=1, kind="stable")[:, :k], np.argsort(v, axis=1, kind="stable")[:, :k]
    return {"top_tokens": valid[top], "top_values": np.take_along_axis(v, top, 1),
            "bottom_tokens": valid[bottom], "bottom_values": np.take_along_axis(v, bottom, 1)}


SELECTION = [pytest.param(True, id="compiled"), pytest.param(False, id="torch")]  # the CPU's and other devices'


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
