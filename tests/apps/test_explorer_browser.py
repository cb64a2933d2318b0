"""A real browser (headless Chromium from Debian, driven by Playwright) uses the explorer, started
with its command line, on a store made by the pipeline: overview -> a neuron -> its clusters and
highlighted tokens -> a similar-cluster link -> search; it saves a screenshot."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from tests.helpers import options, run_stages

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_gpt2, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: the README's test command installs it (apt-get install -y chromium)")
    out = str(tmp_path_factory.mktemp("browser") / "s.zarr")
    run_stages(out, **options(tiny_gpt2, n_sequences=24, ctx_len=32, k=6))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "neuron_embeddings.cli", "explore", out, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"explorer exited: {proc.stdout.read()}")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", out
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def test_browse_overview_neuron_similar_search(server, page, tmp_path):
    url, store = server
    page.goto(url + "/")
    assert page.locator("svg.hist").count() == 4  # 2 layers x (clusters, mean distance)
    page.locator("#most a.neuron").first.click()
    page.wait_for_url(re.compile(r".*/neuron/\d+/\d+$"))
    layer, neuron = map(int, page.url.rsplit("/", 2)[1:])
    assert page.locator("h1").inner_text().startswith(f"Layer {layer} · Neuron {neuron}")
    assert page.locator("svg.dendrogram line.threshold").count() == 1
    assert page.locator("#logits-top tr").count() == page.locator("#logits-bottom tr").count() == 11  # 10 + header

    # clusters, largest first, with highlighted tokens; the max token's activation on hover
    g = zarr.open_group(store, mode="r")
    row = g.attrs["layers"].index(layer)
    sizes = [int(re.search(r"· (\d+) example", t).group(1)) for t in page.locator("section.cluster h2").all_inner_texts()]
    assert len(sizes) == g["metrics/n_clusters"][row, neuron] and sizes == sorted(sizes, reverse=True)
    first = page.locator("section.cluster").first.locator("div.ex").first
    mx = first.locator("span.t.max")
    assert mx.count() == 1
    assert "background" in (mx.get_attribute("style") or "")
    slot = int(first.get_attribute("data-slot"))
    assert float(mx.get_attribute("title")) == pytest.approx(float(g["topk/act"][row, neuron, slot]), rel=1e-2)
    coloured = page.locator("section.cluster span.t[style*='background']").count()
    assert coloured > len(sizes)  # tokens around the max are coloured too
    page.screenshot(path=str(tmp_path / "neuron.png"), full_page=True)

    # follow a similar-cluster link: it lands on that cluster of another neuron
    links = page.locator("a.simlink")
    if links.count() == 0:  # this neuron's clusters are all single examples: take one that has links
        nb = g["similar/neighbours"][:]
        r, j = next((int(r), int(j)) for r, j, c in zip(*(nb[..., 0, 0] >= 0).nonzero()))
        page.goto(f"{url}/neuron/{g.attrs['layers'][r]}/{j}")
        links = page.locator("a.simlink")
    href = links.first.get_attribute("href")
    links.first.click()
    page.wait_for_load_state()
    target = re.match(r"/neuron/(\d+)/(\d+)#cluster-(\d+)", href)
    assert page.url.endswith(href) and page.locator(f"section#cluster-{target.group(3)}").count() == 1
    assert page.locator("h1").inner_text().startswith(f"Layer {target.group(1)} · Neuron {target.group(2)}")

    # navigation: next, then search by the token a cluster peaks on
    page.locator("#next").click()
    page.wait_for_load_state()
    codes = [t.strip() for t in page.locator("section.cluster h2 code").all_inner_texts()]
    token = next(t for t in codes if re.search(r"\w", t))
    page.fill("#search input[name=token]", token)
    page.locator("#search button").click()
    page.wait_for_load_state()
    assert page.locator("#results a.neuron").count() >= 1
    page.locator("#random").click()
    page.wait_for_url(re.compile(r".*/neuron/\d+/\d+$"))
    page.screenshot(path=str(tmp_path / "random.png"))
    assert (tmp_path / "neuron.png").stat().st_size > 10_000
    if os.environ.get("NE_SCREENSHOTS"):  # keep them, e.g. as CI artifacts
        shutil.copy(tmp_path / "neuron.png", os.environ["NE_SCREENSHOTS"])
