#!/usr/bin/env python
"""How many cores a process keeps busy, second by second, against the host's steal and idle time;
then each of its threads' CPU seconds, page faults and context switches over the whole watch.

Reads /proc only (no tracing, no slow-down), so it can watch a real `neuron-embeddings run`:

    .venv/bin/python scripts/diagnostics/cpu_timeline.py -- .venv/bin/neuron-embeddings run --model M ...
    .venv/bin/python scripts/diagnostics/cpu_timeline.py --pid 12345 --interval 5

Why: on this 2-core VM the host takes 0-50 % of the CPU at times (steal), and a wall-time ratio
read during steal says nothing about the code; this separates the process's own idle time from the
host's. Python threads do not name themselves to the kernel: match thread ids with `py-spy dump`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cli import host_times  # noqa: E402 - (steal, all, idle) jiffies of the machine

TICK = os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """The process's CPU seconds so far, its ended threads' included."""
    stat = open(f"/proc/{pid}/stat").read()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / TICK


def thread_times(pid: int) -> dict[int, tuple[float, float, int, int, int]]:
    """Per thread id: (user s, system s, minor faults, voluntary and involuntary context switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            f = stat[stat.rindex(")") + 2:].split()
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
                          if ":" in line)
            out[int(tid)] = (int(f[11]) / TICK, int(f[12]) / TICK, int(f[7]),
                             int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"]))
        except (FileNotFoundError, ProcessLookupError, ValueError, KeyError):
            pass  # a thread that ended meanwhile
    return out


def watch(pid: int, interval: float, alive) -> None:
    """Print a line per interval while `alive()`, then the per-thread totals."""
    first = thread_times(pid)
    seen = dict(first)  # every thread's latest reading, those that ended included
    h0, c0 = host_times(), process_seconds(pid)
    t0 = t_prev = time.perf_counter()
    print(f"{'t, s':>7} {'cores busy':>10} {'steal':>6} {'idle':>6}", flush=True)
    while alive():
        time.sleep(interval)
        try:
            c1 = process_seconds(pid)
            seen.update(thread_times(pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        h1, t1 = host_times(), time.perf_counter()
        steal, total, idle = (b - a for a, b in zip(h0, h1))
        total = total or 1
        print(f"{t1 - t0:7.1f} {(c1 - c0) / (t1 - t_prev):10.2f} {100 * steal / total:5.0f}% {100 * idle / total:5.0f}%",
              flush=True)
        h0, c0, t_prev = h1, c1, t1
    print(f"\nper thread over {t_prev - t0:.1f} s (tid: user s, system s, minor faults, voluntary / involuntary switches):")
    rows = []
    for tid, (u, s, flt, vol, inv) in seen.items():
        u0, s0, f0, v0, i0 = first.get(tid, (0, 0, 0, 0, 0))
        rows.append((u - u0 + s - s0, tid, u - u0, s - s0, flt - f0, vol - v0, inv - i0))
    for cpu, tid, u, s, flt, vol, inv in sorted(rows, reverse=True)[:12]:
        print(f"  {tid:>8}: {u:8.2f} {s:7.2f} {flt:10d} {vol:8d} / {inv:<7d} ({100 * cpu / max(t_prev - t0, 1e-9):.0f} % of a core)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, help="watch this running process")
    p.add_argument("--interval", type=float, default=1.0, help="seconds per line (default 1)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- a command to start and watch")
    a = p.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if (a.pid is None) == (not cmd):
        p.error("give --pid or a command after --")
    if a.pid is not None:
        if not os.path.exists(f"/proc/{a.pid}"):
            p.error(f"no process {a.pid}")
        watch(a.pid, a.interval, lambda: os.path.exists(f"/proc/{a.pid}"))
        return 0
    proc = subprocess.Popen(cmd)
    watch(proc.pid, a.interval, lambda: proc.poll() is None)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
