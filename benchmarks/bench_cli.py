#!/usr/bin/env python
"""What a user runs: `neuron-embeddings run` (the real CLI, in a subprocess, defaults except the
sizes) against a bare forward pass over the same tokens, alternated in rounds.

    .venv/bin/python benchmarks/bench_cli.py [--corpus gpt2|smollm2|both] [--rounds 3]
                                             [--n-sequences 512] [--ctx-len 128] [--k 50]
                                             [--layers 0-3] [--no-similar] [--quick]

Corpora:
- ``gpt2``: a GPT-2-small-shaped model with random weights (12 layers x 3072 neurons, d_model 768,
  a 50,257-entry BPE vocabulary trained on the text; built once in --workdir, as
  bench_pipeline.py / bench_dtype.py build it) over ``builtin:python-docs``.
- ``smollm2``: the real SmolLM2-135M (``builtin:smollm2-135m``) over ``builtin:python-docs``
  tokenized by its own tokenizer, BOS first, special tokens excluded (the CLI's defaults).

Each round: a bare forward (the model loaded here as the CLI loads it, blocks only, stopped after
the last hook the scan needs, same batch size and torch threads as the run), then the CLI run; one
more forward closes the last round. Each run is compared with the mean of the two forwards around
it, so the machine's drift hits both alike; the report gives medians of the per-round ratios:

- scan / forward: the scan marker's ``seconds`` (the stage's unit, writes included) and its
  ``model_seconds`` (the scan's forward with its bookkeeping), summed over blocks;
- whole / forward: the run from the scan's start to the process's exit, less the ``similar``
  stage (start-up and ``similar`` are reported apart, in seconds);
- CPU seconds: the CLI's process during the scan against the forward's process, which the
  host's steal time does not inflate, and the machine's steal share during each forward and scan
  (/proc/stat): on this shared VM a stretch of 30-50 % steal makes any wall-clock ratio meaningless;
- the kernel's (system) share of those CPU seconds, during the scan and after it, the scan's ratio
  in user CPU seconds alone, and the memory the VM handed back to its host meanwhile: memory
  handed back costs ~6-8 s of system time per GiB when next used, and the CLI asks for ~7 GB of
  fresh memory where the bare forward asks for none (docs/performance.md);
- the store's size by array and group (the last round's store), and all but ``embeddings``
  against ``embeddings``.

Targets (issue 17): scan <= 1.11x, whole <= 1.5x the bare forward. ``--quick``: 4 layers,
48 x 128 tokens, k 20, 2 rounds, no similar (~2 min on 2 quiet cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import (DATASET, _log, _set_env, check_store, ensure_model, feed, git_revision,  # noqa: E402
                                       pack, run_cli)

SMOLLM2 = "builtin:smollm2-135m"
TARGETS = {"scan": 1.11, "whole": 1.5}


def host_times() -> tuple[float, float, float]:
    """(steal, all, idle) jiffies of the machine so far (/proc/stat): steal is the share of a
    stretch that the hypervisor gave to other guests. This VM's host is shared: a run and a forward
    a minute apart can see 0 % and 50 % steal, which no alternation evens out."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(f[7]), float(sum(f[:8])), float(f[3])


REPORTED = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_gib() -> float:
    """GiB of freed memory this VM has handed back to its host so far (free page reporting; a
    kernel that exposes the count, else 0). Each page handed back costs a host fault when it is next
    used: on this project's VM, touching such memory took ~6-8 s per GiB against ~0.3 s for memory
    used again at once (docs/performance.md), all of it counted as the process's system time."""
    try:
        return int(REPORTED.read_text()) / 2**20
    except (OSError, ValueError):
        return 0.0


def steal_share(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return round((b[0] - a[0]) / max(b[1] - a[1], 1.0), 4)


def bare_forward(lm, tokens, layers: list[int], batch_size: int, measured: dict | None = None) -> float:
    """Seconds of the bare forward over `tokens`: blocks only, stopped after the last tap the scan
    needs (the scan's own forward without its hook work). `measured`, where given, gets its CPU
    seconds (this process, every thread) and the machine's steal share meanwhile."""
    import numpy as np
    import torch

    from neuron_embeddings.core.models import run_until
    from neuron_embeddings.core.units import unit_source

    taps = unit_source(lm, "", None).taps(max(layers), True)
    hooks = [(name, lambda t: None) for name in taps]
    sync = torch.cuda.synchronize if str(lm.device).startswith("cuda") else (lambda: None)
    host, cpu, given, t0 = host_times(), os.times(), reported_gib(), time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(tokens), batch_size):
            run_until(lm.bridge, torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)).to(lm.device),
                      hooks)
    sync()
    seconds = time.perf_counter() - t0
    if measured is not None:
        end = os.times()
        measured.update(cpu=round(end.user + end.system - cpu.user - cpu.system, 3),
                        sys=round(end.system - cpu.system, 3), steal=steal_share(host, host_times()),
                        returned_gib=round(reported_gib() - given, 2))
    return seconds


def store_sizes(store: Path) -> dict:
    """Bytes on disk of each array of the store (schema paths) and of each group (first component)."""
    from neuron_embeddings.storage import schema

    def du(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    total = du(store)
    arrays = {spec.path: du(store / spec.path) for spec in schema.ARRAYS}
    arrays = {k: v for k, v in arrays.items() if v}
    arrays["(metadata and other)"] = total - sum(arrays.values())
    groups: dict[str, int] = {}
    for path, n in arrays.items():
        groups[path.split("/")[0]] = groups.get(path.split("/")[0], 0) + n
    emb = arrays.get("embeddings", 0)
    return {"total": total, "arrays": arrays, "groups": groups,
            "rest_over_embeddings": round((total - emb) / emb, 4) if emb else None}


class ThreadCpu:
    """CPU seconds of every thread of this process's children (the CLI, its Prefect server, any
    Dask workers), read from /proc every `interval` s: where the cores go while the scan runs.
    Each reading walks every process and the CLI's threads (~3 ms of CPU here); the bare forward has
    no such observer, so it reads seldom (every 0.5 s, with the RSS sampler's 4 a second, took ~1 %
    of a core from the run it measured)."""

    def __init__(self, interval: float = 2.0):
        import threading

        self.samples: list[tuple[float, dict]] = []
        self.interval, self.stop = interval, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> dict:
        import psutil

        out = {}
        for q in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(q.cmdline())
                kind = "cli" if " run " in cmd else ("prefect-server" if "prefect" in cmd or "uvicorn" in cmd
                                                      else Path(q.name()).name)
                # the process's own total counts its threads that ended meanwhile too (the scan ends
                # the forward's OpenMP workers before each bookkeeping; they start again after)
                f = Path(f"/proc/{q.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[(kind, "(process)", str(q.pid))] = (int(f[11]) + int(f[12])) / self.tick
                out[(kind, "(process system)", str(q.pid))] = int(f[12]) / self.tick  # the kernel's share
                for task in Path(f"/proc/{q.pid}/task").iterdir():
                    name = (task / "comm").read_text().strip()
                    f = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    key = (kind, name, task.name)
                    out[key] = (int(f[11]) + int(f[12])) / self.tick
            except (OSError, psutil.Error):
                continue
        return out

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self._read(), host_times()))
            self.stop.wait(self.interval)

    def between(self, t0: float, t1: float) -> dict:
        """CPU seconds per (process kind, thread name) between two wall times (nearest samples), of
        the threads alive at the end (a thread that ended meanwhile counts in its process's total)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (_, a, _), (_, b, _) = inside[0], inside[-1]
        per: dict[str, float] = {}
        for key, v in b.items():
            if key[1].startswith("(process"):
                continue
            name = f"{key[0]}: {key[1]}" + (f" {key[2]}" if key[0] == "cli" else "")  # its threads by id
            per[name] = per.get(name, 0.0) + v - a.get(key, 0.0)
        return {k: round(v, 2) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.05}

    def totals(self, t0: float, t1: float) -> dict:
        """CPU seconds of the CLI's own process (every thread) and of its Prefect server between two
        wall times (up to the last sample that saw the CLI alive), its system (kernel) share, and the
        machine's steal share meanwhile."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1 and any(k[0] == "cli" for k in s[1])]
        if len(inside) < 2:
            return {}
        (_, a, ha), (_, b, hb) = inside[0], inside[-1]
        cpu = lambda kind, what="(process)": round(sum(v - a.get(key, 0.0) for key, v in b.items()  # noqa: E731
                                                       if key[0] == kind and key[1] == what), 3)
        return {"cli_cpu": cpu("cli"), "cli_sys": cpu("cli", "(process system)"), "server_cpu": cpu("prefect-server"),
                "steal": steal_share(ha, hb), "wall": round(inside[-1][0] - inside[0][0], 3)}


def one_round(model: str, a, store: Path, log: Path) -> dict:
    """One CLI run (defaults except the sizes) and its stage seconds from the markers."""
    extra = ["--layers", a.layers] if a.layers else []
    if not a.similar:
        extra.append("--no-similar")
    cpu = ThreadCpu()
    cpu.thread.start()
    harness, given = time.process_time(), reported_gib()
    run = run_cli(model, store, a.n_sequences, a.ctx_len,
                  a.k, a.device, a.threads, log, tuple(extra))
    # this process's own CPU meanwhile (its samplers): taken from the run, not from a bare forward
    run["harness_cpu_share"] = round((time.process_time() - harness) / run["wall_seconds"], 4)
    run["returned_gib"] = round(reported_gib() - given, 2)  # by the whole machine during the run
    if run["returncode"] != 0:
        raise SystemExit(f"the CLI failed (exit {run['returncode']}); log: {log}")
    from benchmarks.bench_pipeline import _markers

    scan = _markers(store, "scan")
    run["scan_seconds"] = round(sum(rec.get("seconds", 0.0) for _, _, rec in scan), 3)
    run["whole_seconds"] = round(run["total_excl_startup"] - (run["similar_span"] or 0.0), 3)
    cpu.stop.set()
    cpu.thread.join()
    start, end = min(end - secs for end, secs, _ in scan), max(end for end, _, _ in scan)
    run["scan_host"] = cpu.totals(start, end)
    run["after_scan_host"] = cpu.totals(end, time.time())  # the shard phase, summarise and exit
    if a.threads_profile:
        run["scan_thread_cpu"] = cpu.between(start, end)
        run["scan_wall_for_cpu"] = round(end - start, 3)
    return run


def bench_corpus(name: str, a) -> dict:
    import numpy as np

    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.core.settings import parse_layers
    from neuron_embeddings.storage import store as st

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = SMOLLM2 if name == "smollm2" else str(ensure_model(work, 12, a.vocab_size))
    lm = load_model(model, a.device)
    layers = parse_layers(a.layers, lm.n_layers)
    bos, _ = feed(lm)
    tokens = pack(lm.tokenizer, a.n_sequences, a.ctx_len, bos)
    stores = work / "cli-stores"
    stores.mkdir(exist_ok=True)
    store = stores / f"{name}.zarr"
    bare_forward(lm, tokens[:4 * a.batch_size], layers, a.batch_size)  # warm-up (the first batches run slower)
    forwards: list[float] = []
    fwd_host: list[dict] = []  # CPU seconds and steal share of each forward
    runs: list[dict] = []
    for r in range(a.rounds):
        fwd_host.append({})
        forwards.append(bare_forward(lm, tokens, layers, a.batch_size, fwd_host[-1]))
        _log(f"{name} round {r}: bare forward {forwards[-1]:.1f} s ({tokens.size / forwards[-1]:.0f} tok/s), "
             f"CPU {fwd_host[-1]['cpu']:.1f} s, steal {100 * fwd_host[-1]['steal']:.0f} %")
        runs.append(one_round(model, a, store, work / f"cli-{name}.log"))
        ru = runs[-1]
        _log(f"{name} round {r}: run wall {ru['wall_seconds']:.1f} s, start-up {ru['startup_seconds']:.1f} s, scan "
             f"{ru['scan_seconds']:.1f} s (model {ru['scan_model_seconds']:.1f} s), whole {ru['whole_seconds']:.1f} s, "
             f"similar {ru['similar_span'] or 0:.1f} s; during the scan: CLI CPU {ru['scan_host'].get('cli_cpu', 0):.1f} s, "
             f"Prefect server CPU {ru['scan_host'].get('server_cpu', 0):.1f} s, steal "
             f"{100 * ru['scan_host'].get('steal', 0):.0f} %")
        if r == 0:  # the run fed the same tokens as the forward
            same = np.array_equal(st.read_tokens(st.Store(str(store)), 0, a.n_sequences), tokens)
            if not same:
                raise SystemExit("the CLI's tokens differ from the bare forward's: the comparison would be unfair")
    fwd_host.append({})
    forwards.append(bare_forward(lm, tokens, layers, a.batch_size, fwd_host[-1]))
    _log(f"{name}: closing bare forward {forwards[-1]:.1f} s, CPU {fwd_host[-1]['cpu']:.1f} s, "
         f"steal {100 * fwd_host[-1]['steal']:.0f} %")
    sizes = store_sizes(store)
    checked = check_store(store)
    if not a.keep_store:
        shutil.rmtree(store, ignore_errors=True)
    ref = [(forwards[i] + forwards[i + 1]) / 2 for i in range(a.rounds)]
    ratios = {
        "scan": [ru["scan_seconds"] / f for ru, f in zip(runs, ref)],
        "scan_model": [ru["scan_model_seconds"] / f for ru, f in zip(runs, ref)],
        "scan_bookkeeping": [ru["scan_bookkeeping_seconds"] / f for ru, f in zip(runs, ref)],
        "whole": [ru["whole_seconds"] / f for ru, f in zip(runs, ref)],
        # CPU seconds, which the host's steal does not inflate: the CLI's process during the scan
        # against the forward's process (mean of the two forwards around the run)
        "scan_cpu": [ru["scan_host"]["cli_cpu"] / ((fwd_host[i]["cpu"] + fwd_host[i + 1]["cpu"]) / 2)
                     for i, ru in enumerate(runs) if ru["scan_host"]],
        # the same in user CPU seconds: without the kernel's time, which on a VM whose host takes
        # back freed memory is mostly the first touch of fresh memory (docs/performance.md)
        "scan_user_cpu": [(ru["scan_host"]["cli_cpu"] - ru["scan_host"]["cli_sys"])
                          / ((fwd_host[i]["cpu"] - fwd_host[i]["sys"] + fwd_host[i + 1]["cpu"] - fwd_host[i + 1]["sys"]) / 2)
                          for i, ru in enumerate(runs) if ru["scan_host"]],
    }
    med = lambda key: round(statistics.median(ru[key] or 0.0 for ru in runs), 3)  # noqa: E731
    return {
        "corpus": name, "model": model, "tokens": int(tokens.size), "layers": len(layers),
        "neurons": len(layers) * lm.d_mlp, "forwards_seconds": [round(f, 3) for f in forwards],
        "ratios": {k: [round(v, 4) for v in vs] for k, vs in ratios.items()},
        "median": {k: round(statistics.median(vs), 4) if vs else None for k, vs in ratios.items()},
        "startup_seconds": med("startup_seconds"), "similar_seconds": med("similar_span"),
        "similar_work_seconds": med("similar_work_seconds"), "shard_phase_seconds": med("scan_end_to_last_shard"),
        "summarise_exit_seconds": med("summarise_and_exit_seconds"), "wall_seconds": med("wall_seconds"),
        "harness_cpu_share": med("harness_cpu_share"),
        "stage_work_seconds": {stage: med(f"{stage}_work_seconds") for stage in ("embed", "cluster", "logits", "centroids")},
        "peak_rss_mib": max(ru["peak_rss_mib"] for ru in runs), "command": runs[0]["command"],
        "loadavg": [ru["loadavg_1min"] for ru in runs], "store": sizes, "check_store": checked,
        "forward_host": fwd_host, "scan_host": [ru["scan_host"] for ru in runs],
        "after_scan_host": [ru["after_scan_host"] for ru in runs],
        "returned_gib": {"forwards": [h.get("returned_gib", 0.0) for h in fwd_host],
                         "runs": [ru["returned_gib"] for ru in runs]},
        "thread_cpu": [{"wall": ru["scan_wall_for_cpu"], "cpu": ru["scan_thread_cpu"]} for ru in runs
                       if "scan_thread_cpu" in ru],
    }


def report(res: dict) -> str:
    L = ["=" * 96, f"bench_cli: {res['command']}", f"code: git {res['git']}; started {res['started']}; "
         f"threads {res['threads']}; batch {res['batch_size']}; rounds {res['rounds']}"]
    for c in res["corpora"]:
        m = c["median"]
        L.append("-" * 96)
        L.append(f"{c['corpus']}: {c['model']}, {c['tokens']:,} tokens, {c['layers']} layers ({c['neurons']:,} neurons)")
        L.append(f"  CLI: {c['command']}")
        L.append(f"  bare forwards (s): {', '.join(f'{f:.1f}' for f in c['forwards_seconds'])}")
        L.append("  steal share of the machine: forwards " + ", ".join(f"{100 * h['steal']:.0f} %" for h in c["forward_host"])
                 + "; scans " + ", ".join(f"{100 * h.get('steal', 0):.0f} %" for h in c["scan_host"]))
        L.append("  CPU seconds (of which system): forwards " + ", ".join(f"{h['cpu']:.1f} ({h.get('sys', 0):.1f})"
                                                                    for h in c["forward_host"])
                 + "; CLI during the scan " + ", ".join(f"{h.get('cli_cpu', 0):.1f} ({h.get('cli_sys', 0):.1f}; server "
                                                        f"{h.get('server_cpu', 0):.1f})" for h in c["scan_host"])
                 + "; CLI after the scan " + ", ".join(f"{h.get('cli_cpu', 0):.1f} ({h.get('cli_sys', 0):.1f})"
                                                       for h in c.get("after_scan_host", [])))
        if any(c["returned_gib"]["runs"]):
            L.append("  memory this VM handed back to its host (GiB; each GiB costs a host fault when next "
                     "used): during the forwards " + ", ".join(f"{g:.1f}" for g in c["returned_gib"]["forwards"])
                     + "; during the runs " + ", ".join(f"{g:.1f}" for g in c["returned_gib"]["runs"]))
        for key, what in (("scan", "scan marker seconds / forward"), ("scan_model", "scan model_seconds / forward"),
                          ("scan_bookkeeping", "  of which the bookkeeping / forward"),
                          ("scan_cpu", "CLI CPU seconds in the scan / forward's CPU s"),
                          ("scan_user_cpu", "  the same, user CPU seconds only"),
                          ("whole", "whole run (no start-up, no similar) / forward")):
            if m[key] is None:
                continue
            tgt = TARGETS.get(key)
            ok = "" if tgt is None else f"   target <= {tgt}: {'OK' if m[key] <= tgt else 'MISSED'}"
            L.append(f"  {what:<48} median {m[key]:.3f}  rounds {', '.join(f'{v:.3f}' for v in c['ratios'][key])}{ok}")
        L.append("  shard stages' seconds, summed over shards (two run at a time): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in c.get("stage_work_seconds", {}).items()))
        L.append(f"  start-up {c['startup_seconds']:.1f} s; shard phase {c['shard_phase_seconds']:.1f} s; similar "
                 f"{c['similar_seconds']:.1f} s (bodies {c['similar_work_seconds']:.1f} s); summarise + exit "
                 f"{c['summarise_exit_seconds']:.1f} s; wall {c['wall_seconds']:.1f} s (medians); peak RSS "
                 f"{c['peak_rss_mib']:,.0f} MiB; load {c['loadavg']}; this process's samplers "
                 f"{100 * (c.get('harness_cpu_share') or 0):.2f} % of a core during the runs")
        for i, ru in enumerate(c.get("thread_cpu") or []):
            L.append(f"  round {i}: CPU seconds per thread alive at the scan's end ({ru['wall']:.1f} s wall): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in list(ru["cpu"].items())[:12]))
        s = c["store"]
        emb = s["arrays"].get("embeddings", 0) or 1
        L.append(f"  store {s['total'] / 1e6:,.1f} MB; all but embeddings / embeddings = {s['rest_over_embeddings']}"
                 f" (goal <= 0.35); check_store: {c['check_store']}")
        for path, n in sorted(((p, n) for p, n in s["arrays"].items() if n >= 1e5), key=lambda kv: -kv[1]):
            L.append(f"    {path:<28}{n / 1e6:>11,.1f} MB{n / emb:>9.3f}x")
        L.append("  groups: " + ", ".join(f"{g} {n / 1e6:,.1f} MB" for g, n in sorted(s["groups"].items(), key=lambda kv: -kv[1])))
    L.append("=" * 96)
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=("gpt2", "smollm2", "both"), default="both")
    p.add_argument("--rounds", type=int, default=None, help="forward/run rounds (default 3; --quick 2)")
    p.add_argument("--n-sequences", type=int, default=None, help="default 512 (--quick 48)")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--k", type=int, default=None, help="default 50 (--quick 20)")
    p.add_argument("--layers", default=None, help="the CLI's --layers (default all; --quick 0-3)")
    p.add_argument("--batch-size", type=int, default=16, help="the CLI's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--vocab-size", type=int, default=50257, help="the random GPT-2's BPE vocabulary")
    p.add_argument("--no-similar", dest="similar", action="store_false")
    p.add_argument("--quick", action="store_true", help="4 layers, 48 x 128 tokens, k 20, 2 rounds, no similar")
    p.add_argument("--keep-store", action="store_true")
    p.add_argument("--threads-profile", action="store_true",
                   help="CPU seconds of each thread of the CLI's processes during the scan (from /proc)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ne-bench"))
    p.add_argument("--out-json")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.n_sequences, a.k = a.rounds or 2, a.n_sequences or 48, a.k or 20
        a.layers, a.similar = a.layers or "0-3", False
    a.rounds, a.n_sequences, a.k = a.rounds or 3, a.n_sequences or 512, a.k or 50
    _set_env(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    res = {"command": shlex.join([sys.executable, *sys.argv]), "git": git_revision(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": a.threads, "batch_size": a.batch_size,
           "rounds": a.rounds, "loadavg_start": os.getloadavg(), "corpora": []}
    for name in (("gpt2", "smollm2") if a.corpus == "both" else (a.corpus,)):
        res["corpora"].append(bench_corpus(name, a))
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(report(res), flush=True)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
