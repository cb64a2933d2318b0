"""What a run needs against what the machine has: memory and disk, compared before anything is
allocated, so a run that cannot fit is a one-line error saying what to change (not a traceback
minutes later, or a store that can never be finished); how the process's malloc keeps the
memory a forward pass frees (`keep_freed_memory`); and letting go of the OpenMP threads a thread no
longer needs (`release_openmp_threads`)."""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import shutil
from pathlib import Path

from neuron_embeddings.core.errors import UserError

log = logging.getLogger(__name__)

KEEP_FREED_BYTES = 1 << 30  # freed memory a process keeps for reuse instead of handing it back to the OS
HEAP_ALLOC_MAX = 32 << 20  # larger allocations are mapped afresh each time (glibc's maximum for this setting)
# (mallopt parameter from malloc.h, the environment variable glibc reads at start, value)
_MALLOC_SETTINGS = ((-3, "MALLOC_MMAP_THRESHOLD_", HEAP_ALLOC_MAX), (-1, "MALLOC_TRIM_THRESHOLD_", KEEP_FREED_BYTES),
                    (-8, "MALLOC_ARENA_MAX", 1))


def human(n_bytes: float) -> str:
    """1536 -> '1.5 KiB', 2.6e12 -> '2.4 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n_bytes) < 1024 or unit == "PiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now: MemAvailable from /proc/meminfo (else the free physical
    pages), or the free memory of a CUDA device; None when unknown."""
    if device.startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0])
        except (ImportError, RuntimeError, AssertionError):
            return None
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    limit = cgroup_headroom()  # a container's memory limit, below the host's
    return limit if host is None else host if limit is None else min(host, limit)


def cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes left under this process's cgroup v2 memory limit (memory.max - memory.current), None
    when there is no limit or no cgroup v2."""
    try:
        limit = Path(root, "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path(root, "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def free_disk(path: str) -> int | None:
    """Free bytes on the filesystem that would hold `path` (its nearest existing ancestor);
    None for URLs (object storage) or when unknown."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return None
    p = Path(str(path).removeprefix("file://")).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_memory(need: int, what: str, hint: str, device: str = "cpu") -> None:
    """UserError when `need` bytes (of `what`) exceed the memory available on `device`."""
    have = available_memory(device)
    if have is not None and need > have:
        where = "on the GPU" if device.startswith("cuda") else "on this machine"
        raise UserError(f"{what}: about {human(need)} of memory needed, but only {human(have)} available {where}; "
                        f"{hint}")


def check_disk(need: int, path: str, what: str, hint: str) -> None:
    """UserError when `need` bytes (of `what`) exceed the free space where `path` would be written."""
    have = free_disk(path)
    if have is not None and need > have:
        raise UserError(f"{what}: up to {human(need)} of disk needed, but only {human(have)} free for {path}; {hint}")


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the memory a forward pass frees instead of returning it to the OS.

    By default glibc hands the top of its heap back once more than ~2x its largest freed block is
    free there, and each thread past the first allocates from an arena of its own. A forward pass
    frees several activation-sized temporaries per layer, so the next layer faults the same pages
    in again: 0.65-0.87 million page faults per 48 x 128-token GPT-2 forward or scan here, against
    15-110 thousand with this. Sets: blocks up to 32 MiB come from the heap, up to 1 GiB of free heap is
    kept, one arena for all threads (the scan runs on a task runner's thread). Memory in use never
    exceeds its earlier peak. Returns False where malloc is not glibc's (macOS, musl): nothing done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: malloc left as it is")
        return False
    ok = all(mallopt(param, value) == 1 for param, _, value in _MALLOC_SETTINGS)
    if not ok:
        log.debug("mallopt refused a setting: malloc partly tuned")
    return ok


def malloc_environ() -> dict[str, str]:
    """`keep_freed_memory`'s settings as the environment variables glibc reads when a process
    starts (for worker processes spawned by others, e.g. Dask's nanny)."""
    return {name: str(value) for _, name, value in _MALLOC_SETTINGS}


@functools.cache
def _libgomp():
    """The GNU OpenMP runtime torch's CPU kernels run on (found in this process's mapped
    libraries), or None where torch uses another (Intel's, LLVM's) or this is not Linux."""
    import torch

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith((".so", ".so.1"))}
        own = {p for p in paths if p.startswith(os.path.dirname(torch.__file__))}  # a wheel's bundled copy
        paths = own or paths
        if len(paths) != 1:
            return None
        lib = ctypes.CDLL(paths.pop())
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


def release_openmp_threads() -> bool:
    """Let the OpenMP worker threads this thread started (torch's intra-op threads) end.

    libgomp keeps a pool of worker threads for every thread that ran a parallel region, and while
    the process manages more such threads than there are CPUs it makes them sleep after ~100 spins
    between regions instead of ~300,000 (its "throttled" spin, libgomp's env.c). The model loaded
    on one thread and the scan run on another made two pools, so the scan's forward ran throttled
    inside the CLI and not in a bare forward. Called where a thread's torch work ends (model load,
    each unit). Returns False where nothing could be done (not libgomp, or inside a parallel region)."""
    lib = _libgomp()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft


def freeze_long_lived() -> None:
    """Collect the cyclic garbage there is now, then move every object still alive out of the cycle
    collector's reach (`gc.freeze`): a loaded model and the libraries around it live as long as the
    process, and each full collection walked all of them again (a CLI run: 9 full collections of
    12-270 ms, one of them inside the scan). Objects frozen are still freed when nothing refers to
    them; only cycles among them would wait for the process's end."""
    gc.collect()
    gc.freeze()
