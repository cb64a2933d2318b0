"""The `neuron-embeddings` command line: run, demo, status, explore (and sae, benchmark).

User mistakes (UserError) print as one line on stderr with exit status 2; a run whose shards did
not all complete exits 1 and says how to resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import signal
import sys
import threading
import time

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.resources import keep_freed_memory
from neuron_embeddings.core.settings import DEFAULT_STRATA, DEMO, ExecSettings, default



def _add_run_options(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", default=default("model"),
                       help=f"Hugging Face model name or local model directory (default {default('model')})")
        p.add_argument("--dataset", required=True,
                       help="a .txt/.jsonl/.parquet file, a Hugging Face dataset name, or builtin:python-docs")
        p.add_argument("--out", required=True, help="the store: a local path or fsspec URL")
        p.add_argument("--n-sequences", type=int, default=default("n_sequences"))
        p.add_argument("--ctx-len", type=int, default=default("ctx_len"))
        p.add_argument("--k", type=int, default=default("k"), help=f"examples per neuron (default {default('k')})")
        p.add_argument("--shard-size", type=int, default=default("shard_size"),
                       help=f"neurons per shard (default {default('shard_size')})")
    p.add_argument("--layers", default=None, help="e.g. 0-11 or 3,5 (default: all)")
    p.add_argument("--selection", default=default("selection"), help="top (default) or band:F, e.g. band:0.75")
    p.add_argument("--strata", nargs="?", const=",".join(f"{f:g}" for f in DEFAULT_STRATA), default=None,
                   metavar="FRACTIONS",
                   help="also sample --strata-k examples from each interval of the unit's maximum these decreasing "
                        "fractions bound, and record each unit's activation histogram (adds a maxima pass); "
                        f"alone: {','.join(f'{f:g}' for f in DEFAULT_STRATA)} (the four quarters)")
    p.add_argument("--strata-k", type=int, default=default("strata_k"),
                   help=f"examples per stratum (default {default('strata_k')})")
    p.add_argument("--linkage", default=default("linkage"), help="average (default), single, complete, weighted")
    p.add_argument("--threshold", type=float, default=default("threshold"),
                   help=f"cosine-distance cut (default {default('threshold')})")
    p.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument("--embedding-dtype", default=default("embedding_dtype"), help="float16 (default) or float32")
    p.add_argument("--dtype", default=default("dtype"),
                   help="the model's forward: float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU; "
                        "a resumed run keeps the store's)")
    p.add_argument("--scan-blocks", type=int, default=None,
                   help="data-parallel blocks of sequences for the scan (default: --workers); fixed per store")
    p.add_argument("--batch-size", type=int, default=default("batch_size"), help="sequences per forward pass")
    p.add_argument("--device", default=default("device"), help="auto (default), cpu or cuda")
    p.add_argument("--workers", type=int, default=default("workers"), help="parallel workers on this machine")
    p.add_argument("--dask-address", default=default("dask_address"), help="run shards on an existing Dask cluster (tcp://HOST:PORT)")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=default("prepend_bos"),
                   help="start each row with the BOS token (default: on for causal models whose tokenizer has one)")
    p.add_argument("--exclude-special-tokens", action=argparse.BooleanOptionalAction,
                   default=default("exclude_special_tokens"),
                   help="never take a special token (BOS, EOS, PAD, CLS, SEP, ...) as an example's max token (default on)")
    p.add_argument("--no-similar", dest="similar", action="store_false",
                   help="skip the similar-clusters stage (all pairs of clusters; the explorer then shows no "
                        "similar-cluster links)")
    p.add_argument("--task-retries", type=int, default=default("task_retries"), help="Prefect retries per task for transient faults")
    p.add_argument("--verbose", action="store_true", help="show Prefect's logs")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="neuron-embeddings", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    _add_run_options(sub.add_parser("run", help="the full pipeline over every MLP neuron of a model"))
    demo = sub.add_parser("demo", help="the pipeline offline on all-MiniLM-L6-v2 and CPython's docs, in minutes")
    demo.add_argument("--out", default="demo.zarr")
    demo.add_argument("--n-sequences", type=int, default=DEMO["n_sequences"])
    _add_run_options(demo, demo=True)
    status = sub.add_parser("status", help="shard states of a store")
    status.add_argument("store")
    status.add_argument("--verify", action="store_true",
                        help="also check every complete shard's chunks (existence, size, checksum) and the arrays' "
                             "metadata; exit 1 if any is damaged")
    explore = sub.add_parser("explore", help="browse a store's neurons, clusters and examples in a web browser")
    explore.add_argument("store")
    explore.add_argument("--port", type=int, default=8501)
    explore.add_argument("--host", default="127.0.0.1")
    explore.add_argument("--model", default=None, help="the store's model, for token importance (optional)")
    explore.add_argument("--device", default="auto", help="for --model: auto (default), cpu or cuda")
    sae = sub.add_parser("sae", help="sparse autoencoders: train one, or evaluate one with the same metrics")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True)  # sae train / sae evaluate
    _add_sae_evaluate(sae_sub)
    _add_sae_train(sae_sub)
    bench = sub.add_parser("benchmark", help="benchmarks of the method itself")
    bench_sub = bench.add_subparsers(dest="benchmark_command", required=True)
    from neuron_embeddings.groundtruth.cli import add_ground_truth_parser

    add_ground_truth_parser(bench_sub)
    return ap


def sae_default(name: str):
    """The default of an SAE training option: the field's default in SAETrainSettings."""
    from neuron_embeddings.core.settings import SAETrainSettings

    return next(f.default for f in dataclasses.fields(SAETrainSettings) if f.name == name)


def _add_sae_train(sae_sub) -> None:
    p = sae_sub.add_parser("train", help="cache one hook's activations and train an SAE on them (optionally with L_N); "
                                         "writes cfg.json, sae_weights.safetensors (SAELens layout) and metrics.json")
    p.add_argument("--model", default="gpt2", help="Hugging Face model name or local model directory (default gpt2)")
    p.add_argument("--dataset", required=True,
                   help="a .txt/.jsonl/.parquet file, a Hugging Face dataset name, or builtin:python-docs")
    p.add_argument("--layer", type=int, required=True, help="the block whose activations the SAE decomposes")
    p.add_argument("--out", required=True, help="SAE directory to write")
    p.add_argument("--hook", default="post", help="post (MLP activations, default), pre, in, resid_pre, resid_mid, "
                                                   "resid_post, mlp_out")
    p.add_argument("--architecture", default=sae_default("architecture"), help="standard (ReLU + L1, default) or topk")
    p.add_argument("--topk", type=int, default=sae_default("topk"), help="k of a topk SAE")
    p.add_argument("--expansion", type=float, default=sae_default("expansion"), help="features per input dimension (default 4)")
    p.add_argument("--l1", type=float, default=sae_default("l1"), help="L1 coefficient on inputs scaled to E||x||^2 = d_in (default 5)")
    p.add_argument("--ln-coef", type=float, default=sae_default("ln_coef"), help="coefficient of the neuron-embedding loss L_N (default 0: off)")
    p.add_argument("--ln-start", type=int, default=sae_default("ln_start"), help="step from which L_N counts (default 0)")
    p.add_argument("--ln-momentum", type=float, default=sae_default("ln_momentum"), help="EMA momentum of the L_N lookup (default 0.9)")
    p.add_argument("--ln-update", default=sae_default("ln_update"), help="ema (default) or mean: how the L_N lookup averages inputs")
    p.add_argument("--steps", type=int, default=sae_default("steps"))
    p.add_argument("--batch-size", type=int, default=sae_default("batch_size"), help="activations per training step (default 4096)")
    p.add_argument("--lr", type=float, default=sae_default("lr"))
    p.add_argument("--warmup", type=int, default=sae_default("warmup"), help="learning-rate warm-up steps (default 5%% of --steps)")
    p.add_argument("--resample-every", type=int, default=sae_default("resample_every"),
                   help="resample dead features every N steps up to 3/4 of the run (default steps/5; 0 = never)")
    p.add_argument("--n-sequences", type=int, default=1024)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=sae_default("seed"))
    p.add_argument("--cache", default=None, help="activation cache directory (default OUT/activations.zarr; reused "
                                                 "when made with the same model, dataset, hook and sizes)")
    p.add_argument("--activation-dtype", default="float16", help="float16 (default) or float32 for the cache")
    p.add_argument("--forward-batch-size", type=int, default=16, help="sequences per forward pass while caching")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")


def cmd_sae_train(a: argparse.Namespace) -> int:
    from neuron_embeddings.core.sae import SAETrainSettings
    from neuron_embeddings.tasks.sae import sae_train

    settings = SAETrainSettings(expansion=a.expansion, architecture=a.architecture, topk=a.topk, l1=a.l1,
                                ln_coef=a.ln_coef, ln_start=a.ln_start, ln_momentum=a.ln_momentum,
                                ln_update=a.ln_update, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                warmup=a.warmup, resample_every=a.resample_every, seed=a.seed)
    if a.forward_batch_size < 1:
        raise UserError(f"--forward-batch-size {a.forward_batch_size}: need at least 1")
    print(f"loading {a.model} ...")
    m = sae_train(a.out, a.model, a.dataset, a.layer, settings, hook=a.hook, n_sequences=a.n_sequences,
                  ctx_len=a.ctx_len, cache=a.cache, device=a.device, activation_dtype=a.activation_dtype,
                  forward_batch_size=a.forward_batch_size)
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
    print(f"\nSAE {m['d_in']} -> {m['d_sae']} features ({m['architecture']}) on {m['hook_name']}, "
          f"held-out {m['n_tokens']} tokens:")
    for key in ("explained_variance", "mse", "l0", "dead_fraction", "dense_fraction", "l_n", "delta_lm_loss",
                "loss_recovered"):
        print(f"  {key:20s} {fmt(m.get(key))}")
    print(f"\nwrote {a.out}/cfg.json, sae_weights.safetensors, metrics.json. Next:\n"
          f"  neuron-embeddings sae evaluate --sae {a.out} --model {a.model} --dataset {a.dataset} --out STORE")
    return 0


def _add_sae_evaluate(sae_sub) -> None:
    p = sae_sub.add_parser("evaluate", help="the pipeline over an SAE's features: a store in the contract's schema "
                                            "(unit sae-feature, one layer)")
    p.add_argument("--sae", required=True, help="SAE directory: cfg.json + sae_weights.safetensors (SAELens layout)")
    _add_run_options(p)


def _options(a: argparse.Namespace) -> dict:
    return dict(model=a.model, dataset=a.dataset, layers=a.layers, n_sequences=a.n_sequences, ctx_len=a.ctx_len,
                k=a.k, selection=a.selection, shard_size=a.shard_size, linkage=a.linkage, threshold=a.threshold,
                seed=a.seed, embedding_dtype=a.embedding_dtype, scan_blocks=a.scan_blocks, device=a.device,
                workers=a.workers, sae=getattr(a, "sae", None),
                similar=a.similar, prepend_bos=a.prepend_bos, exclude_special_tokens=a.exclude_special_tokens,
                dtype=a.dtype, strata=a.strata, strata_k=a.strata_k)


def _quiet_prefect(verbose: bool) -> None:
    if not verbose:  # the per-shard logs still go to the Prefect API (the UI); the terminal shows bars
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        # outside a flow (the in-process prepare) a unit's failure is the CLI's one error line, not also a log line
        logging.getLogger("neuron_embeddings.units").setLevel(logging.CRITICAL)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")


class _NoSignalCrashNotice(logging.Filter):
    """Drops Prefect's "Crash detected! Execution was aborted by an interrupt / a termination signal"
    from the terminal: the command's own line says so (the Prefect UI still gets it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("Crash detected" in msg and "signal" in msg)


def _quiet_crash_notices() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("prefect", "prefect.flow_runs"))):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, _NoSignalCrashNotice) for f in handler.filters):
                handler.addFilter(_NoSignalCrashNotice())


class ProgressMonitor(threading.Thread):
    """Progress bars from the store's progress files and markers (works for any executor). A
    phase's bars open when the phases before it are complete, and each bar closes as soon as its
    stage is complete, keeping the stage's final rate (units done in this run over its time)."""

    def __init__(self, out: str, interval: float = 1.0):
        super().__init__(daemon=True)
        self.out, self.interval, self.stop = out, interval, threading.Event()
        self.bars: dict = {}
        self.baseline: dict[str, int] | None = None  # units complete before this run (a resumed store)

    def _show(self, stage: str, total: int, unit: str, done: int, complete: bool) -> None:
        from tqdm import tqdm

        if stage not in self.bars:  # the rate counts only what this run does
            self.bars[stage] = tqdm(total=total, initial=min(total, self.baseline.get(stage, 0)), desc=f"{stage:8s}",
                                    unit=unit, dynamic_ncols=True, file=sys.stderr, position=len(self.bars),
                                    leave=True, mininterval=0.5)
        bar = self.bars[stage]
        if bar.disable:  # closed
            return
        bar.n = total if complete else min(total, done)
        if complete:
            bar.close()  # its line keeps the stage's final rate
        else:
            bar.refresh()

    def _poll(self) -> None:
        from neuron_embeddings.storage.store import Store
        from neuron_embeddings.tasks.registry import BY_NAME, phases, stage_units

        store = Store(self.out)
        if not store.exists():
            return
        try:
            s, d_mlp = store.settings(), int(store.attrs["d_mlp"])
        except (UserError, KeyError):
            return
        # (phase, stage, done, total, begun, complete), counted in the bar's unit
        bars: list[tuple[int, str, int, int, bool, bool]] = []
        for i, phase in enumerate(phases(s)):
            for stage in phase:
                states, units = store.marker_states(stage.name), stage_units(stage, s, d_mlp)
                n = sum(1 for u in units if states.get(u) == "complete")
                if stage.unit == "seq":  # sequences done, from the blocks' progress files
                    prog = store.read_progress(stage.name)
                    seqs = s.n_sequences if n == len(units) else sum(p["done"] for p in prog.values())
                    bars.append((i, stage.name, seqs, s.n_sequences, bool(prog), n == len(units)))
                else:
                    bars.append((i, stage.name, n, len(units), n > 0, n == len(units)))
        if self.baseline is None:
            self.baseline = {b[1]: b[2] for b in bars}
        for i, name, n, total, begun, complete in bars:
            started = all(b[5] for b in bars if b[0] < i)  # the phases before it are complete
            if (started and (i > 0 or begun)) or complete or name in self.bars:
                self._show(name, total, "seq" if BY_NAME[name].unit == "seq" else "shard", n, complete)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._poll()
            except (OSError, ValueError, KeyError):
                pass
            self.stop.wait(self.interval)
        try:
            self._poll()
        except (OSError, ValueError, KeyError):
            pass
        for bar in self.bars.values():
            bar.close()


def run_pipeline(out: str, options: dict, a: argparse.Namespace) -> dict:
    """Validate and prepare here (so mistakes are one-line errors before any flow runs) while the
    temporary Prefect server boots, then run the flow with progress bars. Returns the flow's summary."""
    from neuron_embeddings.tasks.resolve import resolve_run
    from neuron_embeddings.tasks.prepare import prepare_store

    from neuron_embeddings.flows.server import launch_server
    from neuron_embeddings.storage import lock

    with launch_server() as server:  # it boots while the model loads; dies with this process, however it ends
        print(f"loading {options['model']} ...")
        settings, lm = resolve_run(out, **options)
        with lock.writer_lock(out, run_name="neuron-embeddings run"):  # the flow re-enters it
            prepare_store(out, settings, lm)
            from neuron_embeddings.flows.run import neuron_embeddings_run

            if not a.verbose:
                _quiet_crash_notices()
            monitor = ProgressMonitor(out)
            monitor.start()
            try:
                with server.ready():
                    return neuron_embeddings_run(out=out, batch_size=a.batch_size, task_retries=a.task_retries,
                                                 dask_address=a.dask_address, **options)
            finally:
                monitor.stop.set()
                monitor.join()


def print_summary(summary: dict, out: str) -> None:
    below = all("below_top_behaviours" in r for r in summary["layers"])  # --strata
    print("\nper layer:")
    print(f"  {'layer':>5} {'neurons':>8} {'with ex.':>8} {'clusters':>9} {'mean dist':>9} {'>1 cluster':>10}"
          + ("  behaviours only below the top-k (neurons with one)" if below else ""))
    for r in summary["layers"]:
        print(f"  {r['layer']:>5} {r['neurons']:>8} {r['with_examples']:>8} {r['mean_clusters'] or 0:>9.2f} "
              f"{r['mean_distance'] or 0:>9.3f} {100 * (r['share_multi_cluster'] or 0):>9.1f}%"
              + (f"  {r['below_top_behaviours']:>8} ({100 * (r['share_with_below_top'] or 0):.1f}%)" if below else ""))
    for title, key in (("most polysemantic", "most_polysemantic"), ("least polysemantic", "least_polysemantic")):
        print(f"\n{title} neurons (clusters: top tokens the examples peak on):")
        for n in summary[key][:5]:
            parts = [f"#{c['cluster']} ({c['size']}): " + " ".join(repr(t) for t in c["tokens"])
                     for c in n["clusters"][:4]]
            more = f" +{len(n['clusters']) - 4} more" if len(n["clusters"]) > 4 else ""
            print(f"  L{n['layer']} N{n['neuron']}: {n['n_clusters']} clusters, mean distance "
                  f"{n['mean_distance']:.3f} | " + " | ".join(parts) + more)


def cmd_run(a: argparse.Namespace, options: dict) -> int:
    from neuron_embeddings.core.hub import check_sources

    ExecSettings(batch_size=a.batch_size, device=a.device, workers=a.workers, dask_address=a.dask_address,
                 task_retries=a.task_retries)  # the checks that need nothing else, before anything is loaded
    from neuron_embeddings.flows.runners import check_dask_address

    check_dask_address(a.dask_address)
    check_sources(options["model"], options["dataset"])  # before torch and Prefect: a Hub name offline fails now
    from neuron_embeddings.flows.run import ShardsFailed

    try:
        summary = run_pipeline(a.out, options, a)
    except ShardsFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a fault while writing (a full disk, a file size limit, ...): one line, resumable
        if getattr(a, "verbose", False):
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: writing the store {a.out} failed: {e.strerror or e}{where}; free disk space (or choose "
              "another --out) and rerun the same command to resume", file=sys.stderr)
        return 1
    print_summary(summary, a.out)
    return _closing_status(a.out)


def _closing_status(out: str) -> int:
    from neuron_embeddings.tasks.registry import run_status

    st = run_status(out)
    print(f"\nstore: {out} ({st.complete} complete, {st.failed} failed, {st.pending} pending)")
    return 0 if st.failed == 0 and st.pending == 0 else 1


def cmd_demo(a: argparse.Namespace) -> int:
    a.model = DEMO["model"]
    for key, value in DEMO.items():
        if not hasattr(a, key):
            setattr(a, key, value)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    rc = cmd_run(a, _options(a))
    print(f"\ndemo finished in {time.time() - t0:.0f} s. {demo_next_steps(a.out)}")
    return rc


def demo_next_steps(out: str) -> str:
    """What the demo suggests next, the explorer first."""
    return (f"Next:\n"
            f"  neuron-embeddings explore {out}   # browse every neuron's clusters in a web browser\n"
            f"  neuron-embeddings status {out}\n"
            f"  python -c \"import zarr; g = zarr.open_group('{out}'); print(g['metrics/n_clusters'][:].mean(axis=1))\"\n"
            f"  neuron-embeddings run --model gpt2 --dataset <corpus> --out run.zarr   # GPT-2 small, every neuron\n"
            f"  neuron-embeddings run --model builtin:smollm2-135m --dataset builtin:python-docs --out smol.zarr"
            f"   # a real causal LM, offline")


def cmd_status(a: argparse.Namespace) -> int:
    from neuron_embeddings.storage.status import format_status
    from neuron_embeddings.tasks.registry import run_status

    print(format_status(run_status(a.store)))
    if not a.verify:
        return 0
    from neuron_embeddings.storage.integrity import format_verification, verify
    from neuron_embeddings.storage.store import Store

    v = verify(Store(a.store))
    print("\n".join(format_verification(v)))
    return 0 if v.ok else 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that it unwinds the
    same way (the flow marked crashed, the lock released, the temporary server stopped)."""


def _on_sigterm(signum, frame) -> None:
    if not getattr(_on_sigterm, "fired", False):  # once: a second SIGTERM does not cut the cleanup short
        _on_sigterm.fired = True
        raise Terminated()


def _sigterm_as_interrupt():
    """Handle SIGTERM like SIGINT (main thread only); returns what restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _on_sigterm.fired = False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _interrupted(a: argparse.Namespace, argv: list[str] | None, e: KeyboardInterrupt) -> int:
    """One line: which signal, and the command that resumes; 143 after SIGTERM, 130 after SIGINT."""
    name, rc = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
    if a.command in ("explore", "status"):
        print(f"stopped by {name}", file=sys.stderr)
    else:
        command = shlex.join(["neuron-embeddings", *(sys.argv[1:] if argv is None else argv)])
        print(f"interrupted by {name}; to resume, rerun: {command}", file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _quiet_prefect(getattr(a, "verbose", False))
    keep_freed_memory()  # before the threads that allocate start: one arena, pages reused across layers
    restore_sigterm = _sigterm_as_interrupt()
    try:
        if a.command == "run":
            return cmd_run(a, _options(a))
        if a.command == "demo":
            return cmd_demo(a)
        if a.command == "status":
            return cmd_status(a)
        if a.command == "explore":
            if not 0 <= a.port <= 65535:
                raise UserError(f"--port {a.port}: use a port from 0 to 65535, e.g. 8501")
            from neuron_embeddings.explorer.app import serve

            serve(a.store, host=a.host, port=a.port, model=a.model, device=a.device)
            return 0
        if a.command == "sae" and a.sae_command == "train":
            return cmd_sae_train(a)
        if a.command == "sae" and a.sae_command == "evaluate":
            return cmd_run(a, _options(a))
        if a.command == "benchmark" and a.benchmark_command == "ground-truth":
            from neuron_embeddings.groundtruth.cli import cmd_ground_truth

            return cmd_ground_truth(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(a, argv, e)
    finally:
        restore_sigterm()
    return 2


def console_main() -> int:
    """The `neuron-embeddings` command: `main`, then an exit that skips the interpreter's final
    garbage collection over Prefect's and torch's objects (~2 s after a run here); atexit
    handlers (Prefect's server shutdown among them) still run."""
    rc = main()
    import gc

    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(console_main())
