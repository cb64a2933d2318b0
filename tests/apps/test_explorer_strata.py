"""The explorer on a store made with --strata: each unit's histogram with the strata and the top-k
marked, its behaviours across the spectrum with examples badged by source, the depth filter, and
the overview's behaviours below the top; in a real browser too."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from fastapi.testclient import TestClient

from neuron_embeddings.explorer.app import create_app
from neuron_embeddings.explorer.data import ExplorerData
from tests.apps.test_explorer_browser import ARGS, CHROMIUM, _free_port
from tests.helpers import options, run_stages


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("explore-strata") / "s.zarr")
    run_stages(out, **options(tiny_gpt2, n_sequences=24, ctx_len=32, k=6, strata="0.75,0.5,0.25,0", strata_k=3))
    return out


def _neuron_with_a_behaviour_below_the_top(store) -> tuple[int, int]:
    g = zarr.open_group(store, mode="r")
    r, j = np.argwhere(g["strata/below_only"][...] > 0)[0]
    return g.attrs["layers"][int(r)], int(j)


def test_spectrum_view_is_the_store(store):
    d = ExplorerData(store)
    g = zarr.open_group(store, mode="r")
    layer, j = _neuron_with_a_behaviour_below_the_top(store)
    row = d.row_of(layer)
    v = d.spectrum(layer, j)
    np.testing.assert_array_equal(v.hist, g["distribution/hist"][row, j])
    assert v.sources[0] == "top-k" and len(v.sources) == 5
    labels, counts = g["strata/labels"][row, j], g["strata/counts"][row, j]
    assert len(v.clusters) == labels.max() + 1
    for c in v.clusters:
        assert c.counts == counts[c.label].tolist()
        assert len(c.examples) == (labels == c.label).sum()
        assert [e.source for e in c.examples] == sorted(e.source for e in c.examples)
        for src in range(len(v.sources)):  # every example's source agrees with the counts
            assert sum(e.source == src for e in c.examples) == c.counts[src]
        for e in c.examples:
            if e.source > 0:  # a stratum's example: its activation lies in the stratum's interval
                lo, hi = v.intervals[e.source - 1]
                assert lo * v.max <= e.act <= hi * v.max
    assert v.below_only == g["strata/below_only"][row, j] > 0
    assert ExplorerData.spectrum.cache_info().currsize >= 1


def test_depth_filter_and_overview(store):
    client = TestClient(create_app(ExplorerData(store)))
    layer, j = _neuron_with_a_behaviour_below_the_top(store)
    page = client.get(f"/neuron/{layer}/{j}")
    assert page.status_code == 200 and '<svg class="distribution"' in page.text
    assert page.text.count('class="stratum"') == 4 and page.text.count('class="topk"') == 1
    assert "only below the top-k" in page.text
    for depth in range(5):
        sub = client.get(f"/neuron/{layer}/{j}", params={"depth": depth}).text
        badges = re.findall(r'class="badge source s(\d+)"', sub)
        assert set(badges) <= {str(depth)}
    top_only = client.get(f"/neuron/{layer}/{j}", params={"depth": 0}).text
    assert "only below the top-k</span>" not in top_only.split('id="spectrum"')[1]  # those have no top-k example
    assert client.get(f"/neuron/{layer}/{j}", params={"depth": 7}).status_code == 404
    home = client.get("/").text
    g = zarr.open_group(store, mode="r")
    cells = re.findall(r'<td class="below-top">(\d+) ', home)
    assert [int(c) for c in cells] == g["strata/below_only"][...].sum(axis=1).tolist()


def test_browser_shows_the_spectrum_and_filters_by_depth(store, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: the README's test command installs it (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "neuron_embeddings.cli", "explore", store, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        layer, j = _neuron_with_a_behaviour_below_the_top(store)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/neuron/{layer}/{j}")
            svg = page.locator("svg.distribution")
            assert svg.count() == 1 and svg.bounding_box()["width"] > 300
            assert page.locator("svg.distribution rect.bar").count() == 20
            assert page.locator("svg.distribution line.stratum").count() == 4
            n_all = page.locator("section.spectrum-cluster").count()
            assert page.locator("section.spectrum-cluster.below-only").count() >= 1
            page.locator("a.depth").nth(0).click()  # the top-k only
            page.wait_for_load_state()
            assert "depth=0" in page.url
            n_top = page.locator("section.spectrum-cluster").count()
            assert 1 <= n_top < n_all  # behaviours without a top-k example are gone
            assert set(page.locator("#spectrum span.badge.source").all_inner_texts()) == {"top-k"}
            page.screenshot(path=str(tmp_path / "spectrum.png"), full_page=True)
            browser.close()
        assert (tmp_path / "spectrum.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(timeout=20)
