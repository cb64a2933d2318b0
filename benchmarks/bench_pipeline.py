#!/usr/bin/env python
"""Pipeline benchmark on a GPT-2-small-shaped model with random weights.

    .venv/bin/python benchmarks/bench_pipeline.py [--tokens N] [--device cpu|cuda] [--quick]
                                                  [--out-json PATH] [--workdir DIR]

Three measurements, all in one invocation so that every ratio is against references measured in
the same run, on the same machine state:

1. Scan throughput vs a bare forward pass. The tokens are the ones the CLI would use
   (builtin:python-docs packed into N/ctx_len sequences by the model's tokenizer). ONE call of
   ``core.scan.scan_sequences`` runs over all of them; its ``progress`` callback (called after each
   batch, outside the scan's own timing) runs the two references on the SAME batch right there, so
   every scan batch is interleaved with its references (order alternating) and machine noise hits
   all three alike:
     - bare: ``core.models.run_until(bridge, ids, [("blocks.{last}.mlp.hook_post", no-op)])``, the
       forward stopped after the last hook as the scan stops it (the scan's forward without its hook work),
     - hf:   ``bridge.original_model.base_model(ids, use_cache=False)`` (blocks + final norm, no LM head).
   Reported: tokens/s of each (sum of per-batch times), the ratio scan/bare of throughputs, the
   median per-batch ratio, and how much of the scan's time is in its hook work
   (batch_candidates / update_slots, timed by wrapping the module functions).
2. The whole run, via the real CLI in a subprocess (fresh PREFECT_HOME, analytics off, offline).
   Stage times come from the store's markers (``<stage>/<unit>.done`` in its state directory: JSON ``seconds``,
   file mtime = end of the unit). Peak RSS of the CLI process tree from ``os.wait4`` (plus RSS
   sampled with psutil per phase). The machine may be shared, so the report adds two checks on
   the ratio to the item-1 bare forward: the bare forward re-measured right after the CLI run
   (drift), and the bare time implied by the CLI's own scan time x the item-1 scan/bare ratio;
   "CPU seconds / wall" and the load average show contention (ideal CPU/wall ~ threads).
3. Peak memory for N and 2N tokens: the CLI again at 2N (the N run is item 2), or, with
   ``--mem-mode scan``, ``scan_sequences`` alone in two child processes. If the dataset cannot
   fill 2N tokens, N/2 and N are used instead. The table says which.

``--quick``: 4 layers, 8,192 tokens, memory check with the scan alone: a smoke test (~1-2 min).
``--device cuda``: the model and tokens on the GPU, the CLI with --device cuda.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATASET = "builtin:python-docs"
D_MODEL, N_HEAD, N_POSITIONS = 768, 12, 1024


# --- helpers --------------------------------------------------------------------------------------

def _set_env(threads: int) -> None:
    """Before torch is imported: thread counts, quiet and offline libraries."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    from neuron_embeddings.core.resources import keep_freed_memory

    warnings.filterwarnings("ignore")
    keep_freed_memory()  # as the CLI does: the bare forward and the scan under the same malloc settings


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cpu_seconds(who) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def _maxrss_mib(ru_maxrss: int) -> float:
    # Linux: KiB; macOS: bytes
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


def model_dir_for(workdir: Path, n_layer: int, vocab_size: int) -> Path:
    return workdir / f"gpt2-random-L{n_layer}-d{D_MODEL}-v{vocab_size}-s0"


def ensure_model(workdir: Path, n_layer: int, vocab_size: int) -> Path:
    """Build the random GPT-2 once (atomically: built aside, then renamed); reuse it afterwards."""
    from neuron_embeddings.core.synthetic import build_random_gpt2

    d = model_dir_for(workdir, n_layer, vocab_size)
    if (d / "config.json").exists() and any(d.glob("*.safetensors")):
        _log(f"reusing model {d}")
        return d
    _log(f"building random GPT-2 ({n_layer} layers, d_model {D_MODEL}, vocab {vocab_size}) in {d}")
    tmp = Path(tempfile.mkdtemp(prefix=d.name + ".tmp-", dir=workdir))
    build_random_gpt2(tmp, n_layer=n_layer, n_embd=D_MODEL, n_head=N_HEAD, n_positions=N_POSITIONS,
                      vocab_size=vocab_size, seed=0)
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return d


def feed(lm) -> tuple[int | None, tuple[int, ...]]:
    """(BOS id or None, excluded token ids): how the CLI feeds this model by default."""
    from neuron_embeddings.core.models import default_prepend_bos, special_token_ids

    return (lm.tokenizer.bos_token_id if default_prepend_bos(lm) else None), special_token_ids(lm)


def pack(tokenizer, n_sequences: int, ctx_len: int, bos_id: int | None = None):
    """The tokens the CLI would use (same dataset, packing, tokenizer and BOS)."""
    from neuron_embeddings.core.datasets import iter_documents, pack_tokens

    return pack_tokens(iter_documents(DATASET), tokenizer, n_sequences, ctx_len, dataset_name=DATASET, bos_id=bos_id)


def fits(tokenizer, n_sequences: int, ctx_len: int) -> bool:
    from neuron_embeddings.core.errors import UserError

    try:
        pack(tokenizer, n_sequences, ctx_len)
        return True
    except UserError:
        return False


def git_revision() -> str:
    """HEAD of the checkout and whether tracked pipeline code differs from it (others edit concurrently)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = [line[3:] for line in subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                      cwd=ROOT, capture_output=True, text=True, timeout=10,
                                                      check=False).stdout.splitlines() if line.strip()]
        return f"{head}{' (modified: ' + ', '.join(dirty) + ')' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cli_command() -> list[str]:
    for c in (ROOT / ".venv" / "bin" / "neuron-embeddings", Path(sys.executable).parent / "neuron-embeddings"):
        if c.exists():
            return [str(c)]
    found = shutil.which("neuron-embeddings")
    return [found] if found else [sys.executable, "-m", "neuron_embeddings.cli"]


# --- 1. scan vs references ----------------------------------------------------------------------

def _stop_at(bridge, hook: str):
    """The bare forward up to `hook` (the scan's forward without its hook work): ids -> None."""
    from neuron_embeddings.core.models import run_until

    return lambda ids: run_until(bridge, ids, [(hook, lambda t: None)])


def bench_forward(lm, tokens, k: int, batch_size: int, device: str) -> dict:
    """One scan over `tokens`, each batch interleaved with a bare and an HF forward of that batch."""
    import numpy as np
    import torch

    import neuron_embeddings.core.scan as scan_mod
    from neuron_embeddings.core.models import HOOK_ACTIVATION

    bridge = lm.bridge
    layers = list(range(lm.n_layers))
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tok_all = torch.from_numpy(tokens.astype(np.int64))
    bare = _stop_at(bridge, HOOK_ACTIVATION.format(layer=max(layers)))

    def hf(ids):
        bridge.original_model.base_model(ids, use_cache=False)

    # warm-up (not timed): one batch of each path
    with torch.inference_mode():
        ids = tok_all[:batch_size].to(device)
        bare(ids)
        hf(ids)
    scan_mod.scan_sequences(bridge, tokens[:batch_size], 0, layers, k, torch.float16, batch_size, device)
    sync()

    # time the scan's own hook work by wrapping the module functions the hooks call
    hook_time = {"batch_candidates": 0.0, "update_slots": 0.0}
    orig = {name: getattr(scan_mod, name) for name in hook_time}

    def timed(name):
        fn = orig[name]

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                hook_time[name] += time.perf_counter() - t
        return wrapper

    rec = {"scan": [], "bare": [], "hf": []}
    st = {"start": 0, "t_last": 0.0, "in_refs": 0.0}

    def progress(n, _seconds):
        sync()
        now = time.perf_counter()
        rec["scan"].append(now - st["t_last"])
        ids = tok_all[st["start"]:st["start"] + n].to(device)
        st["start"] += n
        order = (("bare", bare), ("hf", hf)) if len(rec["scan"]) % 2 else (("hf", hf), ("bare", bare))
        for name, fn in order:
            t = time.perf_counter()
            fn(ids)
            sync()
            rec[name].append(time.perf_counter() - t)
        st["t_last"] = time.perf_counter()

    for name in hook_time:
        setattr(scan_mod, name, timed(name))
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        load0, cpu0 = os.getloadavg()[0], _cpu_seconds(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        st["t_last"] = t0
        tables = scan_mod.scan_sequences(bridge, tokens, 0, layers, k, torch.float16, batch_size, device,
                                         progress=progress, excluded_ids=feed(lm)[1])
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu0
    finally:
        for name, fn in orig.items():
            setattr(scan_mod, name, fn)
    filled = int(sum(int((t.seq != scan_mod.NO_SEQ).sum()) for t in tables))
    del tables

    n_tok = int(tokens.size)
    tot = {name: sum(v) for name, v in rec.items()}
    per_batch = [b / s for b, s in zip(rec["bare"], rec["scan"])]
    q = max(1, len(per_batch) // 4)
    return {
        "tokens": n_tok, "batches": len(rec["scan"]), "batch_size": batch_size, "layers": len(layers),
        "wall_seconds": round(wall, 3),
        "cpu_per_wall": round(cpu / wall, 3),
        "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "seconds": {name: round(v, 3) for name, v in tot.items()},
        "tokens_per_s": {name: round(n_tok / v, 1) for name, v in tot.items()},
        "ratio_scan_over_bare": round(tot["bare"] / tot["scan"], 4),
        "ratio_scan_over_hf": round(tot["hf"] / tot["scan"], 4),
        "ratio_bare_over_hf": round(tot["hf"] / tot["bare"], 4),
        "median_batch_ratio_scan_over_bare": round(statistics.median(per_batch), 4),
        "ratio_first_quarter": round(sum(rec["bare"][:q]) / sum(rec["scan"][:q]), 4),
        "ratio_rest": round(sum(rec["bare"][q:]) / max(sum(rec["scan"][q:]), 1e-9), 4) if len(per_batch) > q else None,
        "hook_seconds": {name: round(v, 3) for name, v in hook_time.items()},
        "scan_minus_bare_seconds": round(tot["scan"] - tot["bare"], 3),
        "slots_filled": filled,
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


def bare_probe(lm, tokens, batch_size: int, device: str, batches: int) -> dict:
    """Bare-forward throughput on the first `batches` batches (a drift check after the CLI run)."""
    import numpy as np
    import torch

    from neuron_embeddings.core.models import HOOK_ACTIVATION

    bare = _stop_at(lm.bridge, HOOK_ACTIVATION.format(layer=lm.n_layers - 1))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    ts = []
    with torch.inference_mode():
        for i in range(batches):
            ids = torch.from_numpy(tokens[i * batch_size:(i + 1) * batch_size].astype(np.int64)).to(device)
            t = time.perf_counter()
            bare(ids)
            sync()
            ts.append(time.perf_counter() - t)
    n = min(batches * batch_size, len(tokens)) * tokens.shape[1]
    return {"batches": batches, "seconds": round(sum(ts), 3), "tokens_per_s": round(n / sum(ts), 1)}


# --- 2. the whole run via the CLI ---------------------------------------------------------------

def run_cli(model: Path, store: Path, n_sequences: int, ctx_len: int, k: int, device: str, threads: int,
            log_path: Path, extra: tuple[str, ...] = ()) -> dict:
    """Run the real CLI in a subprocess; wall time, peak RSS, and per-stage times from the markers."""
    prefect_home = tempfile.mkdtemp(prefix="ne-bench-prefect-")
    env = dict(os.environ, PREFECT_HOME=prefect_home, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cmd = cli_command() + ["run", "--model", str(model), "--dataset", DATASET, "--out", str(store),
                           "--n-sequences", str(n_sequences), "--ctx-len", str(ctx_len), "--k", str(k),
                           "--device", device, *extra]
    if store.exists():
        shutil.rmtree(store)
    _log(f"CLI: {shlex.join(cmd)}  (log: {log_path})")
    try:
        with open(log_path, "wb") as logf:
            load0 = os.getloadavg()[0]
            t_start = time.time()
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
            sampler = RssSampler(p.pid)
            sampler.thread.start()
            _, status, ru = os.wait4(p.pid, 0)
            t_end = time.time()
            sampler.stop.set()
            sampler.thread.join()
            p.returncode = os.waitstatus_to_exitcode(status)
    finally:
        shutil.rmtree(prefect_home, ignore_errors=True)
    out = {"command": shlex.join(cmd), "returncode": p.returncode, "wall_seconds": round(t_end - t_start, 3),
           "peak_rss_mib": round(_maxrss_mib(ru.ru_maxrss), 1), "n_sequences": n_sequences,
           "cpu_per_wall": round((ru.ru_utime + ru.ru_stime) / (t_end - t_start), 3),
           "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "tokens": n_sequences * ctx_len}
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        tail_text = "\n  ".join(tail)
        _log(f"CLI FAILED (rc {p.returncode}); log tail:\n  {tail_text}")
        return out
    out.update(stage_times(store, t_start, t_end))
    # RSS (sum over the process tree, sampled every second) per phase
    scan_start = t_start + out["startup_seconds"]
    scan_end = scan_start + out["scan_span"]
    last = scan_end + out["scan_end_to_last_shard"]
    out["sampled_peak_rss_mib"] = {"startup": sampler.peak(t_start, scan_start), "scan": sampler.peak(scan_start, scan_end),
                                   "embed_cluster": sampler.peak(scan_end, last), "summarise_exit": sampler.peak(last, t_end)}
    return out


class RssSampler:
    """Polls the RSS of a process and its descendants (psutil), for per-stage peaks. Optional."""

    def __init__(self, pid: int, interval: float = 1.0):
        import threading

        self.samples: list[tuple[float, float]] = []
        self.pid, self.interval, self.stop = pid, interval, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import psutil

            root = psutil.Process(self.pid)
        except Exception:  # noqa: BLE001 - no psutil or process gone: no samples
            return
        while not self.stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = 0
                for q in procs:
                    with contextlib.suppress(Exception):  # a child exited meanwhile
                        rss += q.memory_info().rss
                self.samples.append((time.time(), rss / 2**20))
            except Exception:  # noqa: BLE001 - root exited
                return
            self.stop.wait(self.interval)

    def peak(self, t0: float | None, t1: float | None) -> float | None:
        if t0 is None or t1 is None:
            return None
        vals = [r for t, r in self.samples if t0 <= t <= t1]
        return round(max(vals), 1) if vals else None


def _markers(store: Path, stage: str) -> list[tuple[float, float, dict]]:
    """(end time, seconds, record) of each .done marker of a stage."""
    from neuron_embeddings.storage.store import Store

    d = Path(Store(str(store)).state) / "markers" / stage
    out = []
    for p in sorted(d.glob("*.done")) if d.exists() else []:
        rec = json.loads(p.read_text())
        out.append((p.stat().st_mtime, float(rec.get("seconds", 0.0)), rec))
    return out


def stage_times(store: Path, t_start: float, t_end: float) -> dict:
    st = {s: _markers(store, s) for s in ("prepare", "scan", "embed", "cluster", "centroids", "logits", "similar")}

    def span(ms):
        return (min(e - s for e, s, _ in ms), max(e for e, _, _ in ms)) if ms else (None, None)

    _, prep_end = span(st["prepare"])
    scan_start, scan_end = span(st["scan"])
    emb_start, emb_end = span(st["embed"])
    clu_start, clu_end = span(st["cluster"])
    cen_start, cen_end = span(st["centroids"])
    sim_start, sim_end = span(st["similar"])
    _, log_end = span(st["logits"])
    shard_end = max(x for x in (scan_end, emb_end, clu_end, cen_end, log_end) if x is not None)
    last = max(x for x in (shard_end, sim_end) if x is not None)
    r = {
        "units": {s: len(v) for s, v in st.items()},
        "startup_seconds": round(scan_start - t_start, 3),
        "startup_to_prepare_done": round(prep_end - t_start, 3) if prep_end else None,
        "prepare_work_seconds": round(sum(s for _, s, _ in st["prepare"]), 3),
        "prepare_done_to_scan_start": round(scan_start - prep_end, 3) if prep_end else None,
        "scan_span": round(scan_end - scan_start, 3),
        "scan_work_seconds": round(sum(s for _, s, _ in st["scan"]), 3),
        "scan_model_seconds": round(sum(float(rec.get("model_seconds", 0)) for _, _, rec in st["scan"]), 3),
        "scan_bookkeeping_seconds": round(sum(float(rec.get("bookkeeping_seconds", 0)) for _, _, rec in st["scan"]), 3),
        # how full the scan's x pools got (their memory grows with the tokens until they are full)
        "scan_pools_full": sum(int(rec.get("pools_full", 0)) for _, _, rec in st["scan"]),
        "scan_pool_rows_max": max((int(rec.get("pool_rows_max", 0)) for _, _, rec in st["scan"]), default=0),
        "scan_pool_cap": max((int(rec.get("pool_cap", 0)) for _, _, rec in st["scan"]), default=0),
        "logits_work_seconds": round(sum(s for _, s, _ in st["logits"]), 3),
        "embed_span": round(emb_end - emb_start, 3) if emb_end else None,
        "embed_work_seconds": round(sum(s for _, s, _ in st["embed"]), 3),
        "cluster_span": round(clu_end - clu_start, 3) if clu_end else None,
        "cluster_work_seconds": round(sum(s for _, s, _ in st["cluster"]), 3),
        "centroids_work_seconds": round(sum(s for _, s, _ in st["centroids"]), 3),
        "similar_span": round(sim_end - shard_end, 3) if sim_end else None,
        "similar_work_seconds": round(sum(s for _, s, _ in st["similar"]), 3),
        "scan_end_to_last_shard": round(shard_end - scan_end, 3),
        "summarise_and_exit_seconds": round(t_end - last, 3),
        "total_excl_startup": round(t_end - scan_start, 3),
    }
    gaps = (r["scan_end_to_last_shard"] - r["embed_work_seconds"] - r["cluster_work_seconds"]
            - r["centroids_work_seconds"])
    r["embed_cluster_orchestration_seconds"] = round(gaps, 3)  # wall of the shard phase not in task bodies (negative
    # when shards overlap: tasks.shards runs two at a time on 2 cores)
    r["scan_write_seconds"] = round(r["scan_work_seconds"] - r["scan_model_seconds"], 3)
    return r


def check_store(store: Path) -> str | None:
    tool = ROOT.parent / "shared" / "tools" / "check_store.py"
    if not tool.exists():
        return None
    p = subprocess.run([sys.executable, str(tool), str(store)], capture_output=True, text=True, check=False)
    lines = (p.stdout + p.stderr).strip().splitlines()
    return lines[-1] if lines else f"(no output, rc {p.returncode})"


# --- 3. scan alone in a child process (memory) --------------------------------------------------

def scan_child(spec: dict) -> dict:
    """Load the model, pack tokens, run scan_sequences; report peak RSS (and CUDA peak)."""

    import torch

    global DATASET
    DATASET = spec["dataset"]
    torch.set_num_threads(spec["threads"])
    from neuron_embeddings.core.models import load_model
    from neuron_embeddings.core.scan import scan_sequences

    lm = load_model(spec["model"], spec["device"])
    bos, excluded = feed(lm)
    tokens = pack(lm.tokenizer, spec["n_sequences"], spec["ctx_len"], bos)
    rss_loaded = _maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    t0 = time.perf_counter()
    scan_sequences(lm.bridge, tokens, 0, list(range(lm.n_layers)), spec["k"], torch.float16,
                   spec["batch_size"], lm.device, excluded_ids=excluded)
    secs = time.perf_counter() - t0
    cuda = lm.device.startswith("cuda")
    return {"tokens": int(tokens.size), "scan_seconds": round(secs, 3),
            "rss_after_load_mib": round(rss_loaded, 1),
            "peak_rss_mib": round(_maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1),
            "cuda_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}


def run_scan_child(model: Path, n_sequences: int, a) -> dict:
    spec = {"model": str(model), "device": a.device, "n_sequences": n_sequences, "ctx_len": a.ctx_len, "k": a.k,
            "batch_size": a.batch_size, "threads": a.threads,
            "dataset": DATASET}
    _log(f"scan-only child: {n_sequences} x {a.ctx_len} tokens")
    p = subprocess.run([sys.executable, __file__, "--_scan-child", json.dumps(spec)], capture_output=True,
                       text=True, cwd=str(ROOT), check=False)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("SCAN_CHILD "):
            return json.loads(line[len("SCAN_CHILD "):])
    raise RuntimeError(f"scan child failed (rc {p.returncode}): {(p.stdout + p.stderr)[-2000:]}")


# --- report -------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def report(res: dict) -> str:
    cfg, f1, run, mem = res["config"], res.get("forward"), res.get("run"), res.get("memory")
    L = []
    L.append("=" * 100)
    L.append(f"neuron-embeddings pipeline benchmark  ({cfg['mode']}; device {cfg['device']}; torch threads "
             f"{cfg['threads']}; {cfg['n_layer']} layers x d_mlp {cfg['d_mlp']} = {cfg['neurons']} neurons; "
             f"k {cfg['k']}; batch {cfg['batch_size']})")
    L.append(f"model: {cfg['model']}")
    L.append(f"command: {cfg['command']}")
    L.append(f"host: {cfg['host']}")
    git_end = res.get("git_at_end")
    L.append(f"code: git {cfg.get('git')}" + (f"  (CHANGED during the run: now {git_end})" if git_end and git_end != cfg.get("git") else ""))
    L.append("-" * 100)
    if f1:
        tps = f1["tokens_per_s"]
        L.append(f"1. forward throughput over {f1['tokens']:,} tokens ({f1['batches']} batches, each scan batch "
                 f"interleaved with its references)")
        L.append(f"   {'path':<44}{'seconds':>10}{'tokens/s':>11}{'vs bare':>10}")
        L.append(f"   {'bare blocks forward (run_with_hooks + stop)':<44}{f1['seconds']['bare']:>10.1f}{tps['bare']:>11.0f}"
                 f"{1.0:>10.3f}")
        L.append(f"   {'raw HF transformer (blocks + ln_f)':<44}{f1['seconds']['hf']:>10.1f}{tps['hf']:>11.0f}"
                 f"{f1['seconds']['bare'] / f1['seconds']['hf']:>10.3f}")
        L.append(f"   {'scan_sequences (top-k + x, all layers)':<44}{f1['seconds']['scan']:>10.1f}{tps['scan']:>11.0f}"
                 f"{f1['ratio_scan_over_bare']:>10.3f}")
        ok = "OK" if f1["ratio_scan_over_bare"] >= 0.9 else "BELOW TARGET"
        L.append(f"   scan/bare throughput ratio {f1['ratio_scan_over_bare']:.3f} (target >= 0.9: {ok}); "
                 f"median per-batch {f1['median_batch_ratio_scan_over_bare']:.3f}; first quarter "
                 f"{f1['ratio_first_quarter']:.3f}, rest {_f(f1['ratio_rest'], '{:.3f}')}; scan/hf "
                 f"{f1['ratio_scan_over_hf']:.3f}")
        L.append(f"   contention check: CPU seconds / wall {f1['cpu_per_wall']:.2f} (threads {cfg['threads']}); "
                 f"1-min load average {f1['loadavg_1min'][0]} -> {f1['loadavg_1min'][1]}")
        hk = f1["hook_seconds"]
        L.append(f"   scan - bare = {f1['scan_minus_bare_seconds']:.1f} s; in the scan's own work: batch_candidates "
                 f"{hk['batch_candidates']:.1f} s, update_slots {hk['update_slots']:.1f} s")
    if run:
        L.append("-" * 100)
        L.append(f"2. whole run via the CLI, {run['tokens']:,} tokens, all stages ({run.get('units', {})})")
        L.append(f"   {run['command']}")
        if run["returncode"] != 0:
            L.append(f"   FAILED with exit status {run['returncode']}")
        else:
            rows = [
                ("fixed start-up (process -> scan start)", run["startup_seconds"], None),
                ("  of which: start -> prepare done (imports, model load, tokenize, store)", run["startup_to_prepare_done"], None),
                ("  of which: prepare done -> scan start (Prefect server + flow start)", run["prepare_done_to_scan_start"], None),
                ("scan (span)", run["scan_span"], f"model {run['scan_model_seconds']:.1f} s, write {run['scan_write_seconds']:.1f} s"),
                ("embed (sum of shard bodies)", run["embed_work_seconds"], f"span {_f(run['embed_span'])} s"),
                ("cluster (sum of shard bodies)", run["cluster_work_seconds"], f"span {_f(run['cluster_span'])} s"),
                ("centroids (sum of shard bodies)", run["centroids_work_seconds"], None),
                ("shard phase (scan end -> last shard; two shards at a time per worker)", run["scan_end_to_last_shard"],
                 f"shard bodies sum {run['embed_work_seconds'] + run['cluster_work_seconds'] + run['centroids_work_seconds']:.1f} s"),
                ("similar clusters (span after the last shard)", run["similar_span"], f"bodies {_f(run['similar_work_seconds'])} s"),
                ("summarise + exit (last marker -> process exit)", run["summarise_and_exit_seconds"], None),
                ("total excluding start-up (scan start -> exit)", run["total_excl_startup"], None),
                ("wall time of the CLI process", run["wall_seconds"], None),
            ]
            for name, v, note in rows:
                L.append(f"   {name:<74}{_f(v):>9} s" + (f"   ({note})" if note else ""))
            if f1 and f1["tokens"] == run["tokens"]:
                bare_s = f1["seconds"]["bare"]
                r = run["total_excl_startup"] / bare_s
                ok = "OK" if r <= 1.5 else "ABOVE TARGET"
                L.append(f"   total-excl-startup / bare forward ({bare_s:.1f} s, item 1): {r:.3f} (target <= 1.5: {ok});"
                         f" scan span / bare: {run['scan_span'] / bare_s:.3f}; wall / bare: {run['wall_seconds'] / bare_s:.3f}")
                ba = res.get("bare_after_run")
                if ba:
                    bare_after = run["tokens"] / ba["tokens_per_s"]
                    L.append(f"   drift check: bare forward re-measured right after the CLI run ({ba['batches']} batches): "
                             f"{ba['tokens_per_s']:.0f} tok/s (item 1: {f1['tokens_per_s']['bare']:.0f}) -> "
                             f"total-excl-startup / that = {run['total_excl_startup'] / bare_after:.3f}")
                est = run["scan_model_seconds"] * f1["ratio_scan_over_bare"]
                L.append(f"   noise check: bare time implied inside this run (scan model seconds x item-1 ratio) {est:.1f} s"
                         f" -> total-excl-startup / that = {run['total_excl_startup'] / est:.3f}")
            L.append(f"   peak RSS of the CLI: {run['peak_rss_mib']:,.0f} MiB; CPU seconds / wall {run['cpu_per_wall']:.2f};"
                     f" 1-min load average {run['loadavg_1min'][0]} -> {run['loadavg_1min'][1]}")
            sp = run.get("sampled_peak_rss_mib") or {}
            if any(v is not None for v in sp.values()):
                L.append("   sampled RSS peaks of the process tree (MiB): " + ", ".join(
                    f"{k} {_f(v, '{:,.0f}')}" for k, v in sp.items()))
            if run.get("check_store"):
                L.append(f"   check_store.py: {run['check_store']}")
    if mem:
        L.append("-" * 100)
        a, b = mem["runs"]
        L.append(f"3. peak memory vs tokens ({mem['method']}): {a['tokens']:,} tokens -> {a['peak_rss_mib']:,.0f} MiB, "
                 f"{b['tokens']:,} tokens -> {b['peak_rss_mib']:,.0f} MiB")
        for p in (a, b):
            if p.get("scan_span") is not None:
                L.append(f"   {p['tokens']:>9,} tokens: scan {p['scan_span']:.1f} s, total excl. start-up "
                         f"{p['total_excl_startup']:.1f} s, wall {p['wall_seconds']:.1f} s; pools full "
                         f"{p.get('scan_pools_full')}, most rows {_f(p.get('scan_pool_rows_max'), '{:,}')} of "
                         f"{_f(p.get('scan_pool_cap'), '{:,}')}; sampled peaks " + ", ".join(
                             f"{k} {_f(v, '{:,.0f}')}" for k, v in (p.get("sampled_peak_rss_mib") or {}).items()))
        ok = "OK" if mem["growth_pct"] < 10 else "ABOVE TARGET"
        if a.get("scan_pools_full") == 0:
            L.append("   the smaller run's pools never filled: memory grows with tokens until they do (the check is "
                     "only meaningful past that: more tokens, e.g. --dataset FILE --tokens N)")
        L.append(f"   growth {mem['growth_pct']:+.2f} % (target < 10 %: {ok})"
                 + (f"; CUDA peak {a.get('cuda_peak_gib')} -> {b.get('cuda_peak_gib')} GiB" if a.get("cuda_peak_gib") else ""))
    L.append("=" * 100)
    return "\n".join(L)


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    global DATASET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=None, help="tokens for items 1-2 (default 65536; --quick 8192)")
    ap.add_argument("--model", default=None, help="a model to benchmark instead of the random GPT-2 small "
                                                  "(e.g. builtin:smollm2-135m; --layers and --vocab-size then unused)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="4 layers, 8k tokens, scan-only memory check")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--workdir", default=None, help="model and stores (default: $TMPDIR/ne-bench)")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--layers", type=int, default=None, help="model layers (default 12; --quick 4)")
    ap.add_argument("--vocab-size", type=int, default=1000,
                    help="BPE vocabulary (default 1000: builtin:python-docs then holds ~160k tokens, enough for 2N)")
    ap.add_argument("--dataset", default=DATASET,
                    help=f"the corpus (default {DATASET}; any --dataset the CLI takes, e.g. a text file, for more "
                         "tokens than it holds)")
    ap.add_argument("--mem-mode", choices=("cli", "scan", "none"), default=None,
                    help="item 3 by the CLI at 2N (default) or scan_sequences alone at N and 2N (--quick default)")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--no-similar", action="store_true",
                    help="run the CLI with --no-similar (the core pipeline without the all-pairs similar-clusters stage)")
    ap.add_argument("--keep-stores", action="store_true")
    ap.add_argument("--_scan-child", dest="scan_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    _set_env(a.threads)
    DATASET = a.dataset

    if a.scan_child:
        print("SCAN_CHILD " + json.dumps(scan_child(json.loads(a.scan_child))), flush=True)
        return 0

    a.tokens = a.tokens or (8192 if a.quick else 65536)
    a.layers = a.layers or (4 if a.quick else 12)
    a.mem_mode = a.mem_mode or ("scan" if a.quick else "cli")
    if a.tokens % a.ctx_len:
        ap.error(f"--tokens must be a multiple of --ctx-len ({a.ctx_len})")
    n_seq = a.tokens // a.ctx_len
    workdir = Path(a.workdir or Path(tempfile.gettempdir()) / "ne-bench").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    model = a.model or ensure_model(workdir, a.layers, a.vocab_size)
    from neuron_embeddings.core.models import load_model

    t = time.perf_counter()
    lm = load_model(str(model), a.device)
    _log(f"model loaded in {time.perf_counter() - t:.1f} s; torch {torch.__version__}, threads {torch.get_num_threads()}")
    tokens = pack(lm.tokenizer, n_seq, a.ctx_len, feed(lm)[0])
    res: dict = {"config": {
        "mode": "quick" if a.quick else "full", "device": a.device, "threads": a.threads, "n_layer": lm.n_layers,
        "d_mlp": lm.d_mlp, "neurons": lm.n_layers * lm.d_mlp, "k": a.k, "batch_size": a.batch_size,
        "tokens": int(tokens.size), "ctx_len": a.ctx_len, "model": str(model), "vocab_size": a.vocab_size,
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
                f"torch {torch.__version__}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_revision(),
    }}

    if not a.skip_forward:
        _log(f"1. scan vs references over {tokens.size:,} tokens ...")
        res["forward"] = bench_forward(lm, tokens, a.k, a.batch_size, lm.device)
        f1 = res["forward"]
        _log(f"   bare {f1['tokens_per_s']['bare']:.0f} tok/s, hf {f1['tokens_per_s']['hf']:.0f}, scan "
             f"{f1['tokens_per_s']['scan']:.0f}; scan/bare {f1['ratio_scan_over_bare']:.3f}")
    # the N and 2N token counts for item 3
    if fits(lm.tokenizer, 2 * n_seq, a.ctx_len):
        mem_seqs = (n_seq, 2 * n_seq)
    else:
        mem_seqs = (n_seq // 2, n_seq)
        _log(f"dataset cannot fill {2 * a.tokens:,} tokens: memory check at {mem_seqs[0] * a.ctx_len:,} and {a.tokens:,}")
    stores = workdir / "stores"
    stores.mkdir(exist_ok=True)
    runs_by_seq: dict[int, dict] = {}
    if not a.skip_run:
        _log(f"2. whole run via the CLI ({a.tokens:,} tokens) ...")
        store = stores / f"run-{n_seq}.zarr"
        run = run_cli(model, store, n_seq, a.ctx_len, a.k, a.device, a.threads, workdir / f"cli-{n_seq}.log",
                      ("--no-similar",) if a.no_similar else ())
        if run["returncode"] == 0:
            run["check_store"] = check_store(store)
            _log(f"   total excl. start-up {run['total_excl_startup']:.1f} s, start-up {run['startup_seconds']:.1f} s,"
                 f" peak RSS {run['peak_rss_mib']:.0f} MiB; check_store: {run['check_store']}")
        res["run"] = run
        runs_by_seq[n_seq] = run
        if "forward" in res:  # drift check: the bare forward again, right after the CLI run
            res["bare_after_run"] = bare_probe(lm, tokens, a.batch_size, lm.device, min(8, res["forward"]["batches"]))
            _log(f"   bare forward after the CLI run: {res['bare_after_run']['tokens_per_s']:.0f} tok/s")
        if not a.keep_stores:
            shutil.rmtree(store, ignore_errors=True)

    if a.mem_mode == "cli":
        pts = []
        for s in mem_seqs:
            if s not in runs_by_seq:
                _log(f"3. CLI run at {s * a.ctx_len:,} tokens for the memory check ...")
                store = stores / f"run-{s}.zarr"
                runs_by_seq[s] = run_cli(model, store, s, a.ctx_len, a.k, a.device, a.threads, workdir / f"cli-{s}.log",
                                         ("--no-similar",) if a.no_similar else ())
                if not a.keep_stores:
                    shutil.rmtree(store, ignore_errors=True)
            r = runs_by_seq[s]
            pts.append({"tokens": r["tokens"], "peak_rss_mib": r["peak_rss_mib"], "returncode": r["returncode"],
                        "wall_seconds": r["wall_seconds"], "scan_span": r.get("scan_span"),
                        "total_excl_startup": r.get("total_excl_startup"),
                        "sampled_peak_rss_mib": r.get("sampled_peak_rss_mib"),
                        **{key: r.get(key) for key in ("scan_pools_full", "scan_pool_rows_max", "scan_pool_cap")}})
        method = "full CLI run, peak RSS of the process tree (os.wait4)"
    elif a.mem_mode == "scan":
        pts = [run_scan_child(model, s, a) for s in mem_seqs]
        method = "scan_sequences alone in a child process, ru_maxrss"
    else:
        pts = None
    if pts:
        growth = 100.0 * (pts[1]["peak_rss_mib"] - pts[0]["peak_rss_mib"]) / pts[0]["peak_rss_mib"]
        res["memory"] = {"method": method, "runs": pts, "growth_pct": round(growth, 3)}

    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    res["git_at_end"] = git_revision()
    print(report(res), flush=True)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(res, indent=1))
        _log(f"wrote {a.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
