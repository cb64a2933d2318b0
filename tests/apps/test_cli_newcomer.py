"""What a newcomer meets first: the demo's next steps, progress bars that close with each stage's
final rate, and a Hub name offline failing at once with a one-line error naming local choices."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from neuron_embeddings.cli import ProgressMonitor, demo_next_steps


def test_demo_suggests_the_explorer_first():
    lines = demo_next_steps("demo.zarr").splitlines()
    assert lines[0] == "Next:" and lines[1].split("#")[0].strip() == "neuron-embeddings explore demo.zarr"


def _cli(args: list[str], env: dict, cwd) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "neuron_embeddings.cli", *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr, time.monotonic() - t0


@pytest.mark.parametrize("model,dataset,env,words", [
    ("gpt2", "builtin:python-docs", {"HF_HUB_OFFLINE": "1"},
     ["--model gpt2", "HF_HUB_OFFLINE", "local model directory", "builtin:smollm2-135m", "build_random_gpt2"]),
    # no HF_HUB_OFFLINE, but nothing answers at the Hub's address (a port nobody listens on)
    ("gpt2", "builtin:python-docs", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     ["--model gpt2", "127.0.0.1 is unreachable", "builtin:all-MiniLM-L6-v2"]),
    ("builtin:all-MiniLM-L6-v2", "someone/some-dataset", {"HF_HUB_OFFLINE": "1"},
     ["--dataset someone/some-dataset", "HF_HUB_OFFLINE", ".txt/.jsonl/.parquet", "builtin:python-docs"]),
])
def test_hub_names_offline_fail_at_once(tmp_path, model, dataset, env, words):
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")} | env
    rc, err, seconds = _cli(["run", "--model", model, "--dataset", dataset, "--out", str(tmp_path / "s.zarr")],
                            env, tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert seconds < 20, seconds  # loose: the Hub clients' retries took 30-60 s
    assert not (tmp_path / "s.zarr").exists()


def test_progress_bars_close_stage_by_stage(tiny_gpt2, tmp_path, capsys):
    """Each bar opens when its phase can start and closes as soon as its stage is complete."""
    from neuron_embeddings.storage.store import Store
    from neuron_embeddings.tasks.prepare import prepare_store
    from neuron_embeddings.tasks.registry import phases
    from neuron_embeddings.tasks.resolve import resolve_run
    from tests.helpers import options

    out = str(tmp_path / "bars.zarr")
    settings, lm = resolve_run(out, **options(tiny_gpt2))
    plan = prepare_store(out, settings, lm)
    monitor = ProgressMonitor(out)
    monitor._poll()
    assert monitor.bars == {}  # nothing has begun
    closed = lambda: {name for name, bar in monitor.bars.items() if bar.disable}
    for i, phase in enumerate(phases(Store(out).settings())):
        names = [s.name for s in phase]
        if i > 0:  # the phase before is complete: this phase's bars are open, at 0
            assert all(monitor.bars[n].n == 0 and not monitor.bars[n].disable for n in names), names
        units = plan["blocks"] if phase[0].over == "blocks" else plan["shards"]
        for unit in units:
            for stage in phase:
                stage.task.fn(out, unit, "cpu", 8)
        monitor._poll()
        assert set(names) <= closed(), (names, closed())
        for name in names:
            bar = monitor.bars[name]
            assert bar.n == bar.total == (settings.n_sequences if name == "scan" else len(plan["shards"]))
    assert closed() == {"scan", "embed", "cluster", "centroids", "logits", "similar"}
    err = capsys.readouterr().err
    assert "seq/s" in err and "shard/s" in err  # each closed bar's line keeps its rate
