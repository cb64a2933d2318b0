"""Adjusted Rand index (Hubert & Arabie 1985) from a contingency table, in NumPy.

ARI compares two partitions of the same n items: 1 when they are the same partition (whatever the
label names), about 0 for independent random labelings, negative when they agree less than chance.
With the pair counts of the contingency table N[i, j] (items in true class i and predicted cluster j),
a_i = row sums, b_j = column sums and C(x) = x (x - 1) / 2:

    index = sum C(N_ij),  expected = sum C(a_i) * sum C(b_j) / C(n),
    ARI   = (index - expected) / (0.5 * (sum C(a_i) + sum C(b_j)) - expected).

When the denominator is 0 the two partitions are both "one cluster" or both "all singletons", hence
identical, and ARI is 1 (scikit-learn's convention too).
"""
from __future__ import annotations

import numpy as np


def contingency_table(labels_true_N: np.ndarray, labels_pred_N: np.ndarray) -> np.ndarray:
    """int64 [n_true_classes, n_pred_clusters]: how many items fall in each (true, predicted) pair.

    Labels can be any integers (negative ones too); only their equality matters.
    """
    t_N, p_N = np.asarray(labels_true_N), np.asarray(labels_pred_N)
    if t_N.shape != p_N.shape or t_N.ndim != 1:
        raise ValueError(f"need two 1-D label arrays of one length, got {t_N.shape} and {p_N.shape}")
    _, ti_N = np.unique(t_N, return_inverse=True)
    _, pi_N = np.unique(p_N, return_inverse=True)
    n_t, n_p = (int(ti_N.max()) + 1, int(pi_N.max()) + 1) if len(t_N) else (0, 0)
    table_TP = np.zeros((n_t, n_p), dtype=np.int64)
    np.add.at(table_TP, (ti_N, pi_N), 1)
    return table_TP


def _pairs(x: np.ndarray) -> float:
    """sum over entries of C(x, 2) = x (x - 1) / 2, as a float (exact for realistic n)."""
    x = x.astype(np.float64)
    return float((x * (x - 1) / 2).sum())


def adjusted_rand_index(labels_true_N: np.ndarray, labels_pred_N: np.ndarray) -> float:
    """ARI between two labelings of the same items; see the module docstring. 1.0 for n < 2."""
    table_TP = contingency_table(labels_true_N, labels_pred_N)
    n = int(table_TP.sum())
    if n < 2:
        return 1.0
    index = _pairs(table_TP)
    rows, cols = _pairs(table_TP.sum(axis=1)), _pairs(table_TP.sum(axis=0))
    expected = rows * cols / (n * (n - 1) / 2)
    denom = 0.5 * (rows + cols) - expected
    if denom == 0:
        return 1.0
    return float((index - expected) / denom)
