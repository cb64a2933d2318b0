"""One writer per store: `_lock.json` names the live run that writes it.

On a POSIX filesystem (a local path, NFS, ...) the lock is the kernel's: the holder keeps
`_lock.json` open with an exclusive `flock`, which the kernel drops when the process ends, however
it ends (SIGKILL included). Why two runs can never both hold it:

- Only a process holding the flock of the file at the path changes the path: it renames its own
  record (already flocked) over it on takeover, or unlinks it on release. A new lock file appears
  only by `link`, which fails when the path exists, and is flocked before it appears.
- So a taker flocks the file it opened (non-blocking: a live holder means refusal), then checks
  that this file is still the one at the path (same device and inode); if not, it retries. While
  it holds that flock nobody else can change the path, so it may replace the file.

The holder touches the file's mtime every `HEARTBEAT_S` seconds (the heartbeat). A free file
whose record names another host, or which is not a record this code wrote (reported in one line),
is refused until its mtime is `stale_after` seconds old: this covers filesystems whose locks are
host-local. On object storage (other fsspec URLs) the lock is a best effort: see docs/store.md.
Re-entrant within one process: the CLI and the flow it starts share the lock.
"""
from __future__ import annotations

import errno
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

try:
    import fcntl
except ImportError:  # not POSIX: the best-effort protocol everywhere
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = "_lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
_ATTEMPTS = 20  # each lost race means another run changed the lock meanwhile; it then holds it or released it

_held: dict[str, "_Holder"] = {}
_held_lock = threading.Lock()


class StoreLocked(UserError):
    """Another live run writes this store (or its lock file cannot be judged yet)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def parse_lock(raw: bytes) -> tuple[dict | None, str]:
    """The record in a lock file's bytes, or (None, what is wrong with them)."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(rec, dict):
        return None, f"JSON {json.dumps(rec)[:20]}, not an object"
    for key, kind in (("owner", str), ("host", str), ("pid", int), ("started", (int, float))):
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            return None, f"its {key!r} is {json.dumps(rec.get(key))[:40]}"
    if "heartbeat" in rec and (not isinstance(rec["heartbeat"], (int, float)) or isinstance(rec["heartbeat"], bool)):
        return None, f"its 'heartbeat' is {json.dumps(rec['heartbeat'])[:40]}"
    return rec, ""


def read_lock(url: str) -> dict | None:
    """The store's lock record; None without a lock file; {"unreadable": why} for a malformed one."""
    fs, root = fsspec.core.url_to_fs(str(url))
    try:
        raw = fs.cat_file(f"{root}/{LOCK_NAME}")
    except FileNotFoundError:
        return None
    rec, why = parse_lock(raw)
    return rec if rec is not None else {"unreadable": why}


def is_live(url: str) -> bool:
    """Whether a run looks alive on the store, for display only (it takes no lock): its lock file
    was touched within three heartbeats, and its process is alive when it runs on this host."""
    fs, root = fsspec.core.url_to_fs(str(url))
    try:
        info = fs.info(f"{root}/{LOCK_NAME}")
    except (FileNotFoundError, OSError):
        return False
    rec = read_lock(url)
    if rec and "pid" in rec and rec.get("host") == socket.gethostname() and not _pid_alive(rec["pid"]):
        return False
    mtime = info.get("mtime") or info.get("LastModified")
    try:
        age = time.time() - (mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime))
    except (TypeError, ValueError):
        return True  # no modification time: trust the file
    return age <= 3 * HEARTBEAT_S


def _holder_text(rec: dict | None, why: str) -> str:
    if rec is None:
        return f"its {LOCK_NAME} is not a lock this program wrote ({why})"
    return (f"pid {rec['pid']} on {rec['host']}, started {time.time() - rec['started']:.0f} s ago"
            + (f", {rec['run']}" if rec.get("run") else ""))


def _refuse_or_take(url: str, rec: dict | None, why: str, beat: float | None, stale_after: float) -> None:
    """Raise StoreLocked unless this free lock file may be taken over; log the takeover."""
    age = time.time() - beat if beat is not None else float("inf")
    local_dead = rec is not None and rec["host"] == socket.gethostname() and not _pid_alive(rec["pid"])
    if not local_dead and age <= stale_after:  # (a negative age, a clock ahead of ours, counts as fresh)
        if rec is None:
            raise StoreLocked(f"{url}: {_holder_text(rec, why)}, last modified {max(age, 0):.0f} s ago; if no run "
                              f"writes this store, delete it or rerun in {stale_after - max(age, 0):.0f} s")
        raise StoreLocked(f"{url} is being written by another run ({_holder_text(rec, why)}); wait for it to "
                          f"finish, or if it crashed, rerun after {stale_after:.0f} s without a heartbeat")
    log.warning("taking over the lock of a run that ended without releasing it on %s (%s)", url, _holder_text(rec, why))


class _Holder:
    """The lock as held by this process; `posix` tells which protocol holds it."""

    def __init__(self, url: str, run_name: str):
        self.url, self.run_name, self.count = url, run_name, 0
        self.owner = uuid.uuid4().hex
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.path = f"{self.root}/{LOCK_NAME}"
        self.posix = isinstance(self.fs, LocalFileSystem) and fcntl is not None
        self.fd: int | None = None
        self.started = time.time()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"lock-heartbeat {url}")

    def record(self) -> bytes:
        rec = {"owner": self.owner, "run": self.run_name, "host": socket.gethostname(), "pid": os.getpid(),
               "started": self.started}
        if not self.posix:
            rec["heartbeat"] = time.time()
        return json.dumps(rec).encode()

    # -- POSIX: flock ----------------------------------------------------------------------------------

    def _candidate(self) -> tuple[int, str]:
        """Our record in a new file under a unique name, flocked before anyone can see it."""
        name = f"{self.path}.{self.owner}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, self.record())
        except BaseException:
            os.close(fd)
            os.unlink(name)
            raise
        return fd, name

    def _posix_try(self, stale_after: float) -> bool:
        """One attempt: True when held, False when the lock changed meanwhile; raises StoreLocked."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            fd, name = self._candidate()
            try:
                os.link(name, self.path)  # fails if the path exists: no overwrite
            except FileExistsError:
                if os.fstat(fd).st_nlink < 2:  # (NFS: a link whose reply was lost still counts)
                    os.close(fd)
                    return False
            finally:
                os.unlink(name)
            self.fd = fd
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec, why = parse_lock(os.pread(fd, 1 << 16, 0))
                raise StoreLocked(f"{self.url} is being written by another run ({_holder_text(rec, why)}); "
                                  "wait for it to finish") from None
            st = os.fstat(fd)
            try:
                at_path = os.stat(self.path)
            except FileNotFoundError:
                at_path = None
            if at_path is None or (at_path.st_dev, at_path.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # released or replaced between our open and our flock
                return False
            rec, why = parse_lock(os.pread(fd, 1 << 16, 0))
            _refuse_or_take(self.url, rec, why, st.st_mtime, stale_after)
            new, name = self._candidate()
            try:
                os.rename(name, self.path)  # we hold the flock of the file at the path: nobody else changes it
            except BaseException:
                os.close(new)
                os.unlink(name)
                raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        self.fd = new
        return True

    # -- object storage: write, wait, re-read ---------------------------------------------------------

    def _object_try(self, stale_after: float) -> bool:
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            self.fs.pipe_file(self.path, self.record())
            time.sleep(0.5)  # object stores: last writer wins; check that it was us
            if (read_lock(self.url) or {}).get("owner") != self.owner:
                raise StoreLocked(f"{self.url} is being written by another run (it took the lock just now)")
            return True
        rec, why = parse_lock(raw)
        if rec is not None and "heartbeat" in rec:
            beat = rec["heartbeat"]
        else:
            try:
                beat = self.fs.modified(self.path).timestamp()
            except (NotImplementedError, AttributeError, OSError, ValueError):
                beat = None  # no way to tell its age: stale
        _refuse_or_take(self.url, rec, why, beat, stale_after)
        try:
            if self.fs.cat_file(self.path) == raw:  # still the stale one (best effort: not atomic here)
                self.fs.rm(self.path)
        except FileNotFoundError:
            pass
        return False

    def take(self, stale_after: float) -> None:
        self.made_root = getattr(self, "made_root", False) or not self.fs.exists(self.root)
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(_ATTEMPTS):
            try:
                if self._posix_try(stale_after) if self.posix else self._object_try(stale_after):
                    return
            except FileNotFoundError:  # the store's directory was removed by a releasing run: recreate it
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as e:
                if not self.posix or e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL,
                                                     errno.EPERM):
                    raise UserError(f"cannot take the writer lock of {self.url}: {e}") from e
                log.warning("%s: this filesystem has no file locks (%s); the lock is a best effort, as on "
                            "object storage", self.url, e)
                self.posix = False
        raise StoreLocked(f"{self.url}: the writer lock changed hands {_ATTEMPTS} times while taking it; try again")

    # -- holding -------------------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                if self.posix:
                    st, at_path = os.fstat(self.fd), os.stat(self.path)
                    if (st.st_dev, st.st_ino) != (at_path.st_dev, at_path.st_ino):
                        log.error("the lock file of %s was replaced or deleted by someone else", self.url)
                        return
                    os.utime(self.fd)
                    continue
                if (read_lock(self.url) or {}).get("owner") != self.owner:
                    log.error("lock on %s was taken over by another run", self.url)
                    return
                self.fs.pipe_file(self.path, self.record())
            except OSError as e:  # a missed beat is not fatal; the next one may succeed
                log.warning("lock heartbeat on %s failed: %s", self.url, e)

    def release(self) -> None:
        self.stop.set()
        if self.posix:
            try:
                st, at_path = os.fstat(self.fd), os.stat(self.path)
                if (st.st_dev, st.st_ino) == (at_path.st_dev, at_path.st_ino):
                    os.unlink(self.path)  # while we still hold the flock
            except FileNotFoundError:
                pass
            finally:
                os.close(self.fd)
            if getattr(self, "made_root", False):  # a refused run leaves nothing it made (a user's empty --out stays)
                try:
                    os.rmdir(self.root)
                except OSError:
                    pass  # not empty: a store
        elif (read_lock(self.url) or {}).get("owner") == self.owner:
            self.fs.rm(self.path)


def acquire(url: str, run_name: str = "", stale_after: float = STALE_AFTER_S) -> _Holder:
    """Take the store's writer lock or raise StoreLocked. Re-entrant within this process."""
    url = str(url)
    with _held_lock:
        if url in _held:
            _held[url].count += 1
            return _held[url]
        holder = _Holder(url, run_name)
        holder.take(stale_after)
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
