"""What a run needs against what the machine has."""
from __future__ import annotations

import subprocess
import sys

import pytest

from neuron_embeddings.core.errors import UserError
from neuron_embeddings.core.resources import cgroup_headroom, check_disk, check_memory, free_disk, human


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
