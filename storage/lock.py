"""One writer per store: `_lock.json` names the live run that writes it.

- Acquire creates the lock file exclusively (O_EXCL locally; write-then-verify on object stores).
- The holder refreshes a heartbeat every `HEARTBEAT_S` seconds from a daemon thread.
- A lock is stale when its heartbeat is older than `stale_after` seconds, or when its holder ran on
  this host and that process is gone; a stale lock is taken over (logged), a live one refused
  with a message that names the holder.
- Re-entrant within one process: the CLI and the flow it starts share the lock.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

from neuron_embeddings.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0

_held: dict[str, "_Holder"] = {}
_held_lock = threading.Lock()


class StoreLocked(UserError):
    """Another live run writes this store."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(url: str) -> dict | None:
    fs, root = fsspec.core.url_to_fs(str(url))
    path = f"{root}/{LOCK_NAME}"
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:  # torn write by a crashed holder: treat as stale
        return {"owner": "unreadable", "heartbeat": 0, "host": "", "pid": -1}


def is_stale(lock: dict, stale_after: float = STALE_AFTER_S, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if now - float(lock.get("heartbeat", 0)) > stale_after:
        return True
    return lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", -1)))


class _Holder:
    def __init__(self, url: str, owner: str, run_name: str):
        self.url, self.owner, self.run_name, self.count = url, owner, run_name, 0
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.path = f"{self.root}/{LOCK_NAME}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-heartbeat {url}")

    def record(self) -> bytes:
        return json.dumps({"owner": self.owner, "run": self.run_name, **_me(),
                           "started": self.started, "heartbeat": time.time()}).encode()

    def create(self) -> bool:
        """Create the lock file if absent; True when this holder owns it afterwards."""
        self.started = time.time()
        self.made_root = getattr(self, "made_root", False) or not self.fs.exists(self.root)
        self.fs.makedirs(self.root, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self.record())
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, self.record())
        time.sleep(0.5)  # object stores: last writer wins; check that it was us
        return (read_lock(self.url) or {}).get("owner") == self.owner

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                if (read_lock(self.url) or {}).get("owner") != self.owner:
                    log.error("lock on %s was taken over by another run", self.url)
                    return
                tmp = f"{self.path}.{self.owner}.tmp"
                self.fs.pipe_file(tmp, self.record())
                self.fs.mv(tmp, self.path)
            except OSError as e:  # a missed beat is not fatal; the next one may succeed
                log.warning("lock heartbeat on %s failed: %s", self.url, e)

    def release(self) -> None:
        self.stop.set()
        if (read_lock(self.url) or {}).get("owner") == self.owner:
            self.fs.rm(self.path)
        if isinstance(self.fs, LocalFileSystem) and self.made_root:  # a refused run leaves nothing it made
            try:
                os.rmdir(self.root)
            except OSError:
                pass  # not empty: a store


def acquire(url: str, run_name: str = "", stale_after: float = STALE_AFTER_S) -> _Holder:
    """Take the store's writer lock or raise StoreLocked. Re-entrant within this process."""
    url = str(url)
    with _held_lock:
        if url in _held:
            _held[url].count += 1
            return _held[url]
        holder = _Holder(url, uuid.uuid4().hex, run_name)
        for _ in range(3):
            if holder.create():
                break
            current = read_lock(url)
            if current is None:
                continue  # released meanwhile
            if not is_stale(current, stale_after):
                age = time.time() - float(current.get("started", time.time()))
                raise StoreLocked(
                    f"{url} is being written by another run (pid {current.get('pid')} on {current.get('host')}, "
                    f"started {age:.0f} s ago{', ' + current['run'] if current.get('run') else ''}); wait for it "
                    f"to finish, or if it crashed, rerun after {stale_after:.0f} s without a heartbeat")
            log.warning("taking over a stale lock on %s (pid %s on %s, last heartbeat %.0f s ago)", url,
                        current.get("pid"), current.get("host"), time.time() - float(current.get("heartbeat", 0)))
            stale = f"{holder.path}.stale-{holder.owner}"
            try:
                holder.fs.mv(holder.path, stale)  # only one taker wins the rename
                holder.fs.rm(stale)
            except (FileNotFoundError, OSError):
                pass
        else:
            raise StoreLocked(f"{url}: could not take the writer lock; try again")
        holder.count = 1
        holder.thread.start()
        _held[url] = holder
        return holder


def release(url: str) -> None:
    url = str(url)
    with _held_lock:
        holder = _held.get(url)
        if holder is None:
            return
        holder.count -= 1
        if holder.count == 0:
            holder.release()
            del _held[url]


@contextmanager
def writer_lock(url: str, run_name: str = "", stale_after: float = STALE_AFTER_S):
    """`with writer_lock(out): ...` holds the store's one-writer lock for the block."""
    acquire(url, run_name, stale_after)
    try:
        yield
    finally:
        release(url)
