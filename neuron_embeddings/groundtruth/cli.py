"""``neuron-embeddings benchmark ground-truth``: options and command (light to import; the
benchmark itself is imported only when the command runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

from neuron_embeddings.core.errors import UserError


def add_ground_truth_parser(bench_sub) -> None:
    """Add the ``ground-truth`` subcommand to the ``benchmark`` subparsers."""
    p = bench_sub.add_parser("ground-truth", help="models with known features: ARI of the clusters against the "
                                                  "truth, baselines, metric rankings, SAEs; writes DIR/report.md")
    p.add_argument("--out", required=True, help="directory for report.md, results.json and the PNG plots")
    p.add_argument("--quick", action="store_true", help="a small configuration (under a minute on 2 cores)")
    p.add_argument("--work", default=None,
                   help="keep the generated models and stores in this directory (default: a temporary one)")


def check_out_dir(out: str | Path) -> Path:
    """The output directory, created; a UserError if it is a file or cannot be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file; give a directory for the report")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return path


def cmd_ground_truth(a: argparse.Namespace) -> int:
    """Run the benchmark, print the headline numbers and where the report is."""
    out = check_out_dir(a.out)
    if a.work is not None:
        check_out_dir(a.work)
    from neuron_embeddings.groundtruth.benchmark import run_benchmark

    command = f"neuron-embeddings benchmark ground-truth {'--quick ' if a.quick else ''}--out {a.out}"
    results = run_benchmark(out, quick=a.quick, work_dir=a.work, command=command)
    print("\nARI against the true features at the defaults (average linkage, t = 0.5); multi = neurons "
          "with several true features in their examples")
    print(f"{'model':8s} {'variant':11s} {'selection':9s} {'multi: emb.':>11s} {'raw x':>6s} {'token':>6s} "
          f"{'random':>6s} {'all: emb.':>10s} {'raw x':>6s}")
    for d in results["datasets"]:
        s = d["default"]
        print(f"{d['generator']:8s} {d['variant']:11s} {d['selection']:9s} {_fmt(s['ari_embedding_multi']):>11s} "
              f"{_fmt(s['ari_raw_x_multi']):>6s} {_fmt(s['ari_input_identity_multi']):>6s} "
              f"{_fmt(s['ari_random_multi']):>6s} {_fmt(s['ari_embedding_all']):>10s} {_fmt(s['ari_raw_x_all']):>6s}")
    print(f"\nreport: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return 0


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"
