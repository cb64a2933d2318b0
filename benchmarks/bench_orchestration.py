"""Orchestration benchmark: Prefect + storage overhead per shard, 2 workers vs 1 on the cluster
stage, and the projected wall time of a full GPT-2 small run with N workers.

    .venv/bin/python benchmarks/bench_orchestration.py [--sequences 64] [--workdir DIR]

Runs the real CLI on a GPT-2-small-shaped model with random weights (12 x 3072 neurons, k = 50),
then reruns the cluster stage alone (markers cleared) with 1 and with 2 workers. All figures are
ratios or costs measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def markers(store: Path, stage: str) -> list[tuple[float, dict]]:
    out = []
    for p in (store / "_markers" / stage).glob("*.done"):
        out.append((p.stat().st_mtime, json.loads(p.read_text())))
    return sorted(out, key=lambda t: t[0])


def stage_stats(store: Path, stage: str) -> dict:
    ms = markers(store, stage)
    bodies = [r["seconds"] for _, r in ms]
    first_start = ms[0][0] - ms[0][1]["seconds"]
    span = ms[-1][0] - first_start
    return {"units": len(ms), "sum_body_s": sum(bodies), "span_s": span,
            "overhead_per_unit_s": (span - sum(bodies)) / len(ms), "body_per_unit_s": sum(bodies) / len(ms)}


def run_cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(ROOT / ".venv/bin/neuron-embeddings"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def storage_share(store: Path, n_shards: int = 6) -> dict:
    """Inside shard bodies: seconds in store reads/writes vs compute, for embed + cluster of a few
    shards (rewriting the same data the run wrote)."""
    from threadpoolctl import threadpool_limits

    from storage import store as st
    from tasks.cluster import cluster_shard
    from tasks.scan import merge_blocks, neuron_embeddings

    s = st.Store(str(store))
    settings = s.settings()
    io = compute = 0.0
    for sh in st.neuron_shards(settings, int(s.attrs["d_mlp"]))[:n_shards]:
        row, sl = sh.row, slice(sh.start, sh.stop)
        region = (row, sl)
        t0 = time.perf_counter()
        parts = {n: st.read(s, f"scan/{n}", (slice(None), row, sl)) for n in ("key", "act", "seq", "pos", "x")}
        w = st.read(s, "weights/W_in", (row, slice(None), sl))
        t1 = time.perf_counter()
        top = merge_blocks(parts["key"], parts["act"], parts["seq"], parts["pos"], parts["x"], settings.k)
        emb = neuron_embeddings(top.x, w, settings.embedding_dtype)
        t2 = time.perf_counter()
        for name, data in (("topk/act", top.act), ("topk/seq", top.seq), ("topk/pos", top.pos), ("embeddings", emb)):
            st.write(s, name, region, data)
        emb2, act2 = st.read(s, "embeddings", region), st.read(s, "topk/act", region)
        t3 = time.perf_counter()
        with threadpool_limits(1, "blas"):
            res = cluster_shard(emb2, act2, settings.linkage, settings.threshold)
        t4 = time.perf_counter()
        st.write(s, "clusters/labels", region, res.labels)
        st.write(s, "clusters/linkage", region, res.linkage)
        for m in ("n_examples", "n_clusters", "max_distance", "mean_distance", "mean_intra", "mean_inter"):
            st.write(s, f"metrics/{m}", region, getattr(res, m))
        t5 = time.perf_counter()
        io += (t1 - t0) + (t3 - t2) + (t5 - t4)
        compute += (t2 - t1) + (t4 - t3)
    return {"io_s_per_shard": io / n_shards, "compute_s_per_shard": compute / n_shards}


def shard_phase(store: Path) -> float:
    """Wall time of the shard phase (embed -> cluster -> centroids per shard, in batches): first
    embed start to last end of any of the three."""
    ends = [m[0] for st in ("embed", "cluster", "centroids") for m in markers(store, st)]
    starts = [m[0] - m[1]["seconds"] for m in markers(store, "embed")]
    return max(ends) - min(starts)


def clear(store: Path, stage: str) -> None:
    for p in (store / "_markers" / stage).glob("*.done"):
        p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=64, help="sequences of 128 tokens for the run")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ne-bench-orch"))
    ap.add_argument("--full-tokens", type=int, default=8192 * 128, help="tokens of the projected full run")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "gpt2-small-random"
    if not (model / "config.json").exists():
        from neuron_embeddings.synthetic import build_random_gpt2

        build_random_gpt2(model, n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=1000)
    store = work / "run.zarr"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(work / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    args = ["run", "--model", str(model), "--dataset", "builtin:python-docs", "--out", str(store),
            "--n-sequences", str(a.sequences), "--ctx-len", "128", "--k", "50", "--device", "cpu",
            "--no-similar"]  # the all-pairs similar stage is measured on its own (README)
    # one shard at a time, so that the shard phase's wall minus its shard bodies is the overhead
    wall = run_cli(args, {**env, "NE_SHARD_THREADS": "1"})
    scan = markers(store, "scan")[0][1]
    per_token = scan["model_seconds"] / scan["tokens"]
    stats = {st: stage_stats(store, st) for st in ("embed", "cluster", "centroids")}
    phase, bodies = shard_phase(store), sum(stats[st]["sum_body_s"] for st in stats)
    share = storage_share(store)
    for st in ("embed", "cluster", "centroids"):  # the shard phase again, as a run does it by default
        clear(store, st)
    run_cli(args, env)
    phase_default = shard_phase(store)
    clear(store, "cluster")
    run_cli(args + ["--workers", "1"], {**env, "NE_SHARD_THREADS": "1"})
    one = stage_stats(store, "cluster")
    clear(store, "cluster")
    run_cli(args + ["--workers", "1"], env)
    one_default = stage_stats(store, "cluster")
    clear(store, "cluster")
    run_cli(args + ["--workers", "2"], env)
    two = stage_stats(store, "cluster")
    speedup = one["span_s"] / two["span_s"]

    neurons = 12 * 3072
    per_neuron = phase_default / neurons
    startup = wall - sum(r["seconds"] for _, r in markers(store, "scan")) - phase  # and summarise, exit
    print("=" * 90)
    print(f"orchestration benchmark: GPT-2-small-shaped random model, {a.sequences} x 128 tokens, k 50, "
          f"{neurons} neurons, shard size 256 ({stats['embed']['units']} shards per stage)")
    print(f"command: {sys.executable} benchmarks/bench_orchestration.py --sequences {a.sequences}")
    print("-" * 90)
    n_shards = stats["embed"]["units"]
    print(f"shard phase (embed + cluster + centroids per shard, batches of shards), one shard at a time: wall {phase:.1f} s, bodies "
          f"{bodies:.1f} s -> Prefect + scheduling overhead {1000 * (phase - bodies) / n_shards:.1f} ms per shard "
          f"({100 * (phase - bodies) / bodies:.1f} % of the bodies); bodies per shard: "
          + ", ".join(f"{st} {1000 * s['body_per_unit_s']:.1f} ms" for st, s in stats.items()))
    print(f"shard phase with the default two shards at a time (1 worker, 2 cores): wall {phase_default:.1f} s "
          f"({phase / phase_default:.2f}x faster than one at a time)")
    print(f"inside a shard body (embed + cluster): store reads/writes {1000 * share['io_s_per_shard']:.1f} ms, "
          f"compute {1000 * share['compute_s_per_shard']:.1f} ms  "
          f"(storage {100 * share['io_s_per_shard'] / (share['io_s_per_shard'] + share['compute_s_per_shard']):.0f} %)")
    print(f"cluster stage alone: 1 worker, one shard at a time {one['span_s']:.1f} s; 2 workers (local Dask) "
          f"{two['span_s']:.1f} s -> speed-up {speedup:.2f}x (aim >= 1.7)")
    print(f"   (1 worker with its default two shards at a time on 2 cores: {one_default['span_s']:.1f} s; "
          f"2 workers vs that {one_default['span_s'] / two['span_s']:.2f}x)")
    print("-" * 90)
    print(f"measured costs: scan {1000 * per_token:.3f} ms/token (12 layers), embed+cluster+centroids "
          f"{1000 * per_neuron:.3f} ms/neuron (1 worker, two shards at a time), fixed start-up ~{startup:.0f} s")
    print(f"projected full GPT-2 small run ({a.full_tokens:,} tokens, {neurons:,} neurons) on machines like this one,"
          " N workers of 2 cores each:")
    for n in (1, 2, 4, 8, 16, 32):
        t = startup + a.full_tokens * per_token / n + neurons * per_neuron / n
        print(f"   N = {n:3d}: {t / 60:7.1f} min")
    print("=" * 90)


if __name__ == "__main__":
    main()
