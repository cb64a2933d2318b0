"""What a run needs against what the machine has."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.resources import (cgroup_headroom, check_disk, check_memory, free_disk, human,
                                              release_openmp_threads)
from tests.threads import in_thread, native_threads, needs_openmp_pool, parallel_op


def test_cgroup_headroom(tmp_path):
    assert cgroup_headroom(str(tmp_path)) is None  # no cgroup v2 files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_headroom(str(tmp_path)) is None  # no limit
    (tmp_path / "memory.max").write_text("5000\n")
    assert cgroup_headroom(str(tmp_path)) == 4000


def test_checks_refuse_only_what_does_not_fit(tmp_path):
    free = free_disk(str(tmp_path / "a" / "b.zarr"))  # the nearest existing ancestor's filesystem
    assert free is not None and free > 0
    check_disk(free // 2, str(tmp_path / "a"), "the store", "lower it")
    with pytest.raises(UserError, match=r"^the store: up to .* of disk needed, but only .* free for .*; lower it$"):
        check_disk(free * 2, str(tmp_path / "a"), "the store", "lower it")
    check_memory(1, "one byte", "nothing")
    with pytest.raises(UserError, match=r"^the tables: about 8.0 PiB of memory needed.*; use less$"):
        check_memory(8 << 50, "the tables", "use less")
    assert free_disk("s3://bucket/store.zarr") is None  # object storage: not checked
    assert human(1536) == "1.5 KiB" and human(3 << 40) == "3.0 TiB"


_FREED_PAGES = """
import resource, sys
import numpy as np
from neuron_embeddings.core.resources import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def layer():  # a forward layer's pattern: several activation-sized temporaries, then all freed
    parts = [np.ones(3 << 20) for _ in range(4)]  # 4 x 24 MiB
    del parts
layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_pages():
    """glibc by default returns freed activation-sized blocks to the OS, and the next layer faults
    them in again; after keep_freed_memory the same pages are reused (each run in a fresh process)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FREED_PAGES, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    pages = 5 * 4 * (24 << 20) // 4096  # what re-faulting every block costs (fewer with huge pages)
    assert faults["default"] > pages // 1000, faults  # the default does fault them in again
    assert faults["keep"] < faults["default"] // 20, faults


@needs_openmp_pool
def test_release_openmp_threads_ends_this_threads_pool_only():
    """A thread that ran a parallel region keeps torch.get_num_threads() - 1 OpenMP workers (more
    such threads than CPUs make libgomp sleep them between regions): released, they end, and the
    next parallel region starts them again. Another thread's pool is left alone."""
    workers = torch.get_num_threads() - 1

    def check():
        before = native_threads()
        parallel_op()
        started = native_threads() - before
        assert release_openmp_threads() is True
        after = native_threads()
        parallel_op()
        again = native_threads() - after
        release_openmp_threads()
        return started, started - after, again

    parallel_op()  # this (main) thread's own pool, which the other thread's release must not touch
    mine = native_threads()
    started, ended, again = in_thread(check)
    assert len(started) == workers and ended == started and len(again) == workers
    assert mine <= native_threads()


@needs_openmp_pool
def test_a_unit_leaves_no_openmp_threads_behind(tmp_path):
    """run_unit lets the torch threads its work started go, whether the work succeeds or fails
    (no store here: marking the successful unit complete then fails, after the release)."""
    from neuron_embeddings.tasks.common import run_unit

    def work(_store):
        parallel_op()
        return {}

    def fail(_store):
        parallel_op()
        raise ValueError("planned")

    def unit(fn, name):
        before = native_threads()
        try:
            run_unit(str(tmp_path / "s.zarr"), "scan", name, fn)
        except (ValueError, RuntimeError):
            pass
        return native_threads() - before

    assert in_thread(lambda: unit(work, "B0")) == set()
    assert in_thread(lambda: unit(fail, "B1")) == set()


_FROZEN_AFTER_LOAD = """
import gc, sys, weakref
from neuron_embeddings.core.models import load_model
class Node:
    pass
garbage = Node(); garbage.self = garbage  # a cycle, unreachable once dropped: for the collector only
dead = weakref.ref(garbage)
del garbage
gc.disable()  # no automatic collection before the load's own
lm = load_model(sys.argv[1], "cpu")
tracked = {id(o) for o in gc.get_objects()}  # what a full collection walks
print(dead() is None, id(lm.bridge) in tracked, gc.get_freeze_count() > 0)
"""


def test_load_model_leaves_the_model_out_of_full_collections(tiny_gpt2):
    """After a model's load the cyclic garbage made so far is collected, and the model (with
    everything alive then) is frozen: later full collections do not walk it (a fresh process)."""
    out = subprocess.run([sys.executable, "-c", _FROZEN_AFTER_LOAD, str(tiny_gpt2)], capture_output=True, text=True,
                         check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout.split()
    assert out == ["True", "False", "True"], out
