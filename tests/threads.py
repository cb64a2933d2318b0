"""Test helpers for threads: which native (OpenMP) threads a process has, a parallel torch operation."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from neuron_embeddings.core.resources import _libgomp


def native_threads() -> set[int]:
    """Ids of this process's threads that are not Python threads (OpenMP's workers among them):
    Python threads that other code starts or ends meanwhile do not count."""
    return {int(t) for t in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


def parallel_op() -> None:
    """A torch operation big enough to run on every torch thread (an OpenMP parallel region)."""
    a = torch.ones(512, 512)
    (a @ a).sum()


needs_openmp_pool = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2
                                       or _libgomp() is None, reason="needs Linux, libgomp and 2+ torch threads")


def in_thread(fn):
    """fn() on a fresh thread that stays alive until fn returns: its result, or its error raised."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
