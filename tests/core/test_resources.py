"""What a run needs against what the machine has."""
from __future__ import annotations

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
