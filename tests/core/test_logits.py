"""Logit effects (core.logits): the top and bottom tokens of rows @ W_U against a NumPy argsort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_embeddings.core.logits import logit_effects, to_vocab


def _brute(rows: np.ndarray, w_u: np.ndarray, k: int) -> dict[str, np.ndarray]:
    valid = np.flatnonzero(np.isfinite(w_u).all(0))
    v = rows.astype(np.float64) @ w_u[:, valid].astype(np.float64)
    top, bottom = np.argsort(-v, axis=1, kind="stable")[:, :k], np.argsort(v, axis=1, kind="stable")[:, :k]
    return {"top_tokens": valid[top], "top_values": np.take_along_axis(v, top, 1),
            "bottom_tokens": valid[bottom], "bottom_values": np.take_along_axis(v, bottom, 1)}


@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_top_and_bottom_tokens_are_the_argsort_for_any_chunk(chunk):
    rng = np.random.default_rng(0)
    rows, w_u = rng.normal(size=(13, 16)).astype(np.float32), rng.normal(size=(16, 300)).astype(np.float32)
    w_u[:, [5, 200]] = np.nan  # tokens the model has no column for: never ranked
    got = logit_effects(torch.from_numpy(rows), torch.from_numpy(w_u), k=10, chunk=chunk)
    want = _brute(rows, w_u, 10)
    for name in ("top_tokens", "bottom_tokens"):
        assert got[name].dtype == np.int32 and np.array_equal(got[name], want[name]), name
        assert not np.isin(got[name], [5, 200]).any()
    for name in ("top_values", "bottom_values"):
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_fewer_tokens_than_ranks_are_padded():
    got = logit_effects(torch.ones(2, 3), torch.tensor([[1.0, 2.0, float("nan")]] * 3), k=4)
    assert got["top_tokens"].tolist() == [[1, 0, -1, -1]] * 2 and got["bottom_tokens"].tolist() == [[0, 1, -1, -1]] * 2
    assert np.isnan(got["top_values"][:, 2:]).all() and got["top_values"][0, :2].tolist() == [6.0, 3.0]


def test_to_vocab_drops_padding_and_marks_missing_tokens():
    w = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_vocab(w, 2), w[:, :2])
    wide = to_vocab(w, 5)
    assert torch.equal(wide[:, :3], w) and torch.isnan(wide[:, 3:]).all()
