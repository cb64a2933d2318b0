"""The ground-truth benchmark: ARI, the toy model of superposition, and the quick configuration end to end
(planted two-feature neurons split exactly into their features, one-feature neurons stay whole)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from sklearn.metrics import adjusted_rand_score

from neuron_embeddings.cli import main
from neuron_embeddings.groundtruth.ari import adjusted_rand_index, contingency_table
from neuron_embeddings.groundtruth.measures import n_present
from neuron_embeddings.groundtruth.planted import merged_x, store_examples, x_path
from neuron_embeddings.groundtruth.sae_bench import mmcs
from neuron_embeddings.groundtruth.toy import (
    ToyConfig,
    active_set_ids,
    dominant_feature,
    feature_scales,
    sample_features,
    select_examples,
    toy_dataset,
    toy_examples,
    train_toy_model,
)
from neuron_embeddings.core.synthetic import PlantedTruth

# --------------------------------------------------------------------------- ARI


@pytest.mark.parametrize("true,pred,expected", [
    ([0, 0, 1, 1], [1, 1, 0, 0], 1.0),  # same partition, other names
    ([0, 0, 1, 2], [0, 0, 1, 1], 4 / 7),  # scikit-learn's documented example
    ([0, 0, 0, 0], [0, 1, 2, 3], 0.0),  # one class, all split
    ([5, 5, 5], [7, 7, 7], 1.0),  # both one cluster
    ([0, 1, 2], [3, 4, 5], 1.0),  # both all singletons
    ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),  # every pair disagrees
    ([3], [9], 1.0),
])
def test_ari_hand_cases(true, pred, expected) -> None:
    assert adjusted_rand_index(np.array(true), np.array(pred)) == pytest.approx(expected, abs=1e-12)


def test_ari_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 80))
        a = rng.integers(-1, int(rng.integers(1, 8)), n)
        b = a.copy() if trial % 5 == 0 else rng.integers(-3, int(rng.integers(1, 12)), n)
        if trial % 7 == 0:  # a coarsening of a: high but not perfect agreement
            b = a // 2
        assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-10), (a, b)


def test_contingency_table() -> None:
    t = contingency_table(np.array([2, 2, -1, 7, 7, 7]), np.array([0, 1, 1, 1, 1, 5]))
    np.testing.assert_array_equal(t, [[0, 1, 0], [1, 1, 0], [0, 2, 1]])  # rows -1, 2, 7; cols 0, 1, 5
    with pytest.raises(ValueError):
        contingency_table(np.zeros(3), np.zeros(4))


def test_n_present_counts_features_with_enough_examples() -> None:
    assert n_present(np.array([0] * 30 + [1] * 5 + [2] * 1 + [-1] * 4)) == 2  # 2: 1 example < max(2, 4)
    assert n_present(np.array([-1, -1])) == 0
    assert n_present(np.array([4, 4, 9, 9])) == 2


# --------------------------------------------------------------------------- toy model


@pytest.fixture(scope="module")
def toy():
    model = train_toy_model(ToyConfig(steps=400, seed=3))
    return model, toy_dataset(model, 20000, seed=11)


def test_toy_data_shapes_and_sparsity(toy) -> None:
    model, data = toy
    cfg = model.config
    assert data.f_BF.shape == (20000, cfg.n_features) and data.x_BD.shape == (20000, cfg.d_model)
    assert data.act_BM.shape == (20000, cfg.d_mlp) and (data.act_BM >= 0).all()
    active = (data.f_BF > 0).mean()
    assert abs(active - cfg.p_active) < 0.1 * cfg.p_active, active  # 16,000 expected actives: ~0.8 % s.d.
    assert data.f_BF.max() <= 1.0 and data.f_BF.min() == 0.0
    np.testing.assert_allclose(data.x_BD, data.f_BF @ model.W_FD, rtol=1e-5, atol=1e-6)  # no noise configured
    np.testing.assert_allclose(data.act_BM, np.maximum(data.x_BD @ model.W_in_DM + model.b_in_M, 0), rtol=1e-5,
                               atol=1e-6)
    assert 0.95 < (data.act_BM.max(0) > 0).mean() <= 1.0  # (almost) no dead neurons


def test_toy_training_beats_predicting_zero(toy) -> None:
    model, _ = toy
    cfg = model.config
    importance = cfg.importance_decay ** np.arange(cfg.n_features)
    zero_loss = (importance * cfg.p_active / 3).sum()  # E[f^2] = p * E[U(0,1)^2] for a zero prediction
    assert model.final_loss < 0.7 * zero_loss, (model.final_loss, zero_loss)


def test_toy_unequal_scales_and_noise() -> None:
    scales = feature_scales(ToyConfig(unequal_scales=True, seed=2))
    assert scales.min() == pytest.approx(0.25) and scales.max() == pytest.approx(1.0) and len(set(scales)) == 80
    f = sample_features(ToyConfig(unequal_scales=True, seed=2), 50000, np.random.default_rng(0), scales)
    assert (f <= scales[None, :] + 1e-7).all()
    assert (f.max(0) > 0.9 * scales).all()  # each feature reaches near its scale
    noisy = train_toy_model(ToyConfig(steps=5, noise=0.2))
    d = toy_dataset(noisy, 2000, seed=1)
    resid = d.x_BD - d.f_BF @ noisy.W_FD
    assert resid.std() == pytest.approx(0.2, rel=0.05)


def test_toy_drivers_agree_with_a_forward_pass_on_single_features(toy) -> None:
    """The feature -> neuron assignment from the weights equals what the layer does on one-hot inputs."""
    model, _ = toy
    F = model.config.n_features
    act_FM = np.maximum(model.pre(model.x(np.diag(model.scale_F).astype(np.float32))), 0)  # feature i alone
    expected = (act_FM > 0) & (act_FM >= 0.5 * act_FM.max(0, keepdims=True))
    np.testing.assert_array_equal(model.drivers_FM(), expected)
    n = model.n_drivers_M()
    assert n.shape == (model.config.d_mlp,) and (n >= 1).all() and n.max() < F
    assert len(set(n.tolist())) >= 3  # neurons differ in their number of features
    # for a single active feature, the dominant feature is that one when it contributes positively
    read = model.read_FM()
    f = np.diag(np.full(F, 0.7, np.float32))
    for j in range(0, model.config.d_mlp, 7):
        np.testing.assert_array_equal(dominant_feature(f, read[:, j]), np.where(read[:, j] > 0, np.arange(F), -1))


def test_toy_selection_and_examples(toy) -> None:
    model, data = toy
    k = 20
    top = select_examples(data.act_BM, k, None, seed=0)
    for j in range(0, model.config.d_mlp, 5):
        expect = np.argsort(-data.act_BM[:, j], kind="stable")[:k]
        np.testing.assert_array_equal(np.sort(data.act_BM[top[j], j]), np.sort(data.act_BM[expect, j]))
    band = select_examples(data.act_BM, k, 0.5, seed=0)
    for j in range(model.config.d_mlp):
        got = band[j][band[j] >= 0]
        assert len(set(got.tolist())) == len(got)
        assert (data.act_BM[got, j] >= 0.5 * data.act_BM[:, j].max()).all()
        assert len(got) == min(k, int((data.act_BM[:, j] >= 0.5 * data.act_BM[:, j].max()).sum()))
    ex = toy_examples(model, data, k, None, 0, "t")
    np.testing.assert_allclose(ex.emb_NKD, ex.x_NKD * model.W_in_DM.T[:, None, :], rtol=1e-6)
    assert (np.diff(ex.act_NK, axis=1)[np.isfinite(np.diff(ex.act_NK, axis=1))] <= 0).all()
    assert ((ex.true_NK >= -1) & (ex.true_NK < model.config.n_features)).all()
    assert active_set_ids(np.array([[0, 1.0], [0, 0.5], [1, 0], [0, 0]])).tolist() == [1, 1, 2, 0]


def test_mmcs() -> None:
    true = np.array([[1.0, 0, 0], [0, 2.0, 0]])
    assert mmcs(true, np.array([[0, 0, 1.0], [0, -5.0, 0], [3.0, 0, 0]])) == (0.5, 0.5)  # sign matters
    m, rec = mmcs(true, np.array([[1.0, 1.0, 0]]))  # one decoder row halfway between both
    assert m == pytest.approx(2 ** -0.5) and rec == 0.0


# --------------------------------------------------------------------------- the quick configuration


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gt-report"), tmp_path_factory.mktemp("gt-work")
    assert main(["benchmark", "ground-truth", "--quick", "--out", str(out), "--work", str(work)]) == 0
    return out, work, json.loads((out / "results.json").read_text())


def _dataset(results: dict, generator: str, variant: str, selection: str) -> dict:
    return next(d for d in results["datasets"] if (d["generator"], d["variant"], d["selection"]) ==
                (generator, variant, selection))


@pytest.mark.parametrize("selection", ["top", "band:0.5"])
def test_quick_planted_neurons_split_into_exactly_their_features(quick, selection) -> None:
    _, _, results = quick
    d = _dataset(results, "planted", "clean", selection)
    pn = {k: np.array([np.nan if v is None else v for v in vals], float) for k, vals in d["per_neuron"].items()}
    two = (pn["n_drivers"] == 2) & (pn["n_present"] == 2)
    one = pn["n_drivers"] == 1
    assert two.sum() >= 8 and one.sum() >= 8
    np.testing.assert_array_equal(pn["ari_embedding"][two], 1.0)
    np.testing.assert_array_equal(pn["n_clusters"][two], 2)
    np.testing.assert_array_equal(pn["n_clusters"][one], 1)
    assert (pn["n_present"] == pn["n_drivers"]).mean() >= 0.9  # k = 50 examples show (nearly) every feature
    assert np.nanmean(pn["ari_random"][two]) < 0.3  # the random baseline really is far from the truth
    assert d["pipeline_clusters_match"]  # the stored clustering is the one scored
    assert d["spearman"]["n_clusters~n_drivers"]["rho"] > 0.95


def test_quick_gated_planted_neurons_recovered_by_the_concatenation_only(quick) -> None:
    """A gated planted model (Llama, bias-free, RMSNorm): at a threshold below the distance the
    shared path leaves between features, [x*w_gate ; x*w_in] splits every multi-feature neuron into
    exactly its features, whichever path reads them; each half alone misses the other path."""
    _, _, results = quick
    d = _dataset(results, "planted", "gated", "top")
    assert d["pipeline_clusters_match"]
    low, default = d["by_path"]["0.2"], d["by_path"]["0.5"]
    assert set(low) == {"gate", "linear", "both"} and all(r["n_multi"] >= 1 for r in low.values())
    assert all(r["ari_embedding"] == 1.0 for r in low.values())
    assert low["linear"]["ari_gate_half"] < 0.5 and low["gate"]["ari_linear_half"] < 0.5
    assert low["gate"]["ari_gate_half"] == 1.0 and low["linear"]["ari_linear_half"] == 1.0
    assert default["both"]["ari_embedding"] == 1.0


def test_quick_planted_examples_are_the_stores(quick) -> None:
    """The examples scored are the store's: x from the scan times W_in is the stored embedding, and the
    true feature of each example is that of the token at its (sequence, position)."""
    _, work, _ = quick
    model_dir = next(work.glob("clean-s0/model"))
    store = next(work.glob("clean-s0/store-top-*.zarr"))
    truth = PlantedTruth.from_json(model_dir)
    g = zarr.open_group(str(store), mode="r")
    x = merged_x(g, 0, x_path(store))
    np.testing.assert_allclose(x * g["weights/W_in"][0].T[:, None, :], g["embeddings"][0], rtol=1e-6, atol=1e-7)
    ex = store_examples(str(store), truth, "clean")
    for row, j in enumerate(ex.info["neurons"]):
        m = ex.mask_NK()[row]
        assert set(ex.true_NK[row][m].tolist()) <= set(truth.neuron_features[j])
        seq, pos = g["topk/seq"][0, j][m], g["topk/pos"][0, j][m]
        np.testing.assert_array_equal(ex.input_NK[row][m], g["tokens"][...][seq, pos])


def test_quick_report(quick) -> None:
    out, _, results = quick
    report = (out / "report.md").read_text()
    for heading in ("## At the tool's defaults", "## Thresholds and linkages", "Spearman", "## SAEs on the toy model",
                    "## Where neuron embeddings win"):
        assert heading in report, heading
    for png in ("sweep_planted.png", "sweep_toy.png", "spearman.png", "clusters_vs_truth.png"):
        assert (out / png).stat().st_size > 5000, png
        assert f"({png})" in report
    toy = _dataset(results, "toy", "base", "top")
    assert len(toy["sweep"]) == len(results["config"]["linkages"]) * len(results["config"]["thresholds"])
    assert toy["default"]["n_neurons"] >= 30
    assert toy["default"]["ari_embedding_multi"] > toy["default"]["ari_random_multi"] + 0.3
    sae = results["sae"]["rows"]
    assert [r["name"] for r in sae] == ["standard", "L_N x 0.01"]
    assert all(0 < r["mmcs"] <= 1 and 0 < r["explained_variance"] <= 1 for r in sae)
    assert (out / "sae.png").exists() and "| `standard` |" in report


def test_benchmark_cli_rejects_a_file_as_out(tmp_path, capsys) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["benchmark", "ground-truth", "--quick", "--out", str(f)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --out") and len(err.strip().splitlines()) == 1
    assert f.read_text() == "x"
