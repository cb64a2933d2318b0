"""The explorer on a damaged store (a message on the page, never an error page or fill values
shown as data) and on a live store (it says how far the run is and refreshes when shards complete)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from neuron_embeddings.explorer.app import create_app
from neuron_embeddings.explorer.data import ExplorerData
from neuron_embeddings.storage.lock import writer_lock
from tests.helpers import copy_store, marker_root, options, run_stages

SMALL = dict(n_sequences=16, ctx_len=16, k=4)


@pytest.fixture(scope="module")
def reference(tiny_gpt2, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    run_stages(out, **options(tiny_gpt2, **SMALL))
    return out


def _client(out: str) -> TestClient:
    data = ExplorerData(out)
    data.refresh_s = 0.0  # look at the markers on every request
    return TestClient(create_app(data))


def _neuron_with_clusters(out: str) -> tuple[int, int]:
    d = ExplorerData(out)
    for layer in d.layers:
        for j in range(64):  # the first shard
            if d.metrics["n_clusters"][d.row_of(layer), j] >= 1:
                return layer, j
    raise AssertionError("no clustered neuron in the first shard")


def test_a_deleted_chunk_of_a_complete_shard_is_a_message_not_fill_values(reference, tmp_path):
    out = str(tmp_path / "s.zarr")
    copy_store(reference, out)
    layer, j = _neuron_with_clusters(out)
    assert "not clustered" not in _client(out).get(f"/neuron/{layer}/{j}").text.lower()
    Path(out, "clusters/labels/c", str(layer), "0", "0").unlink()  # every label of the shard reads as -1
    r = _client(out).get(f"/neuron/{layer}/{j}")
    assert r.status_code == 200
    assert "damaged" in r.text and f"clusters/labels/c/{layer}/0/0 is missing" in r.text
    assert "Cluster 0" not in r.text and "not clustered" not in r.text.lower()
    overview = _client(out).get("/")
    assert overview.status_code == 200 and "This store is damaged" in overview.text


def test_a_chunk_that_does_not_decode_is_a_message_not_an_error_page(reference, tmp_path):
    out = str(tmp_path / "s.zarr")
    copy_store(reference, out)
    for p in marker_root(out).rglob("*.done"):  # as written by an older version: no chunk records
        rec = json.loads(p.read_text())
        rec.pop("chunks", None)
        p.write_text(json.dumps(rec))
    chunk = Path(out, "topk/act/c/0/0/0")
    chunk.write_bytes(chunk.read_bytes()[:-9])
    r = _client(out).get("/neuron/0/3")
    assert r.status_code == 200
    assert "topk/act cannot be read" in r.text and "Zstd decompression error" in r.text
    Path(out, "metrics/n_clusters/c/0/0").write_bytes(b"garbage")
    r = _client(out).get("/")
    assert r.status_code == 200 and "metrics/n_clusters cannot be read" in r.text


def test_the_explorer_follows_a_live_run(tiny_gpt2, tmp_path, reference):
    out = str(tmp_path / "live.zarr")
    opts = options(tiny_gpt2, **SMALL)
    run_stages(out, stages=("scan", "embed"), **opts)  # a run half-way: no clusters yet
    client = _client(out)
    layer, j = _neuron_with_clusters(reference)
    token = ExplorerData(reference).neuron(layer, j).clusters[0].top_tokens[0][0]
    want_hits = ExplorerData(reference).search(token)[1]
    assert want_hits

    page = client.get("/").text
    assert "This store is incomplete: 10 of 42 shards complete" in page  # prepare, scan, 8 embed of 42
    r = client.get(f"/neuron/{layer}/{j}")
    assert r.status_code == 200 and "is not computed yet" in r.text and "not clustered" in r.text
    assert client.get(f"/search?token={token}").status_code == 200
    assert client.app.state.explorer.data.search(token)[1] == []  # nothing clustered yet

    with writer_lock(out, run_name="test run"):
        assert "A run is writing this store: 10 of 42 shards complete" in client.get("/").text
        run_stages(out, **opts)  # the run finishes while the explorer is open
    page = client.get("/").text
    assert "shards complete" not in page and "damaged" not in page
    r = client.get(f"/neuron/{layer}/{j}").text
    assert "not computed yet" not in r and "Cluster 0" in r
    assert client.app.state.explorer.data.search(token)[1] == want_hits
    assert f"{len(want_hits)} clusters, most examples first" in client.get(f"/search?token={token}").text
