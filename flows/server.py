"""The temporary Prefect server of a command-line run, which dies with the process that started it.

Without PREFECT_API_URL, Prefect starts a temporary server in a subprocess on first use and stops it
at exit; a run ended by SIGKILL (or SIGTERM under Prefect's default handling) left it running,
orphaned. `launch_server()` starts the same server (Prefect's own command and app) itself, in a
small launcher that dies with its parent process (Linux: PR_SET_PDEATHSIG; elsewhere a thread
polling the parent's pid), and sends the server's own output to a file (its shutdown tracebacks do
not reach the terminal). It returns at once: the server boots (~9 s here; ~30 s the first time,
while Prefect creates its database) while the command loads the model, and `TemporaryServer.ready()`
waits for it before the flow; on exit that drains this process's log and event queues before
stopping it. Nothing of Prefect's server is imported in this process (~4 s).
Dask's worker processes already die with their parent (distributed's parent-alive pipe).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

# Run in the server's process before uvicorn: die with the parent, whatever ends it.
_LAUNCHER = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv.pop(1))
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    os._exit(1)
def _watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=_watch, daemon=True, name="die-with-parent").start()
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""

_PORTS = range(8000, 9000)  # where Prefect looks for a free port for its temporary server
_PORT_IN_USE = 3  # uvicorn's exit code when the port was taken meanwhile (Prefect then tries another)


def _free_port() -> int:
    """A free local port in Prefect's range for temporary servers."""
    for _ in range(50):
        port = random.choice(_PORTS)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port for the temporary Prefect server in {_PORTS.start}-{_PORTS.stop - 1}")


def _drain_clients() -> None:
    """Send this process's queued Prefect logs and events before the server goes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception as e:  # noqa: BLE001 - best effort at shutdown; the run's result is already decided
            log.debug("draining %s: %s", worker.__name__, e)


class TemporaryServer:
    """Prefect's temporary server (its command, app and settings) in a process started at once;
    `ready()` waits for it to answer and points Prefect at it, `stop()` ends it."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("prefect")
        self._app_dir = str(Path(spec.origin).parent.parent)  # what Prefect passes as --app-dir
        self.output = tempfile.TemporaryFile()
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._launch()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        self.port = _free_port()
        args = ["--app-dir", self._app_dir, "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # its own session: a terminal's Ctrl-C reaches the run, which stops the server after its last report
        self.process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *args], env=env,
                                        stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def _tail(self) -> str:
        self.output.seek(0)
        return self.output.read()[-2000:].decode(errors="replace")

    def wait(self) -> None:
        """Block until the server answers its health check (Prefect's startup timeout, the CLI sets
        120 s); a port taken meanwhile: launched again on another."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == _PORT_IN_USE:
                self._launch()
                continue
            if code is not None:
                raise RuntimeError(f"the temporary Prefect server did not start (exit code {code})\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:  # not listening yet (URLError, timeouts and resets are OSErrors)
                pass
            time.sleep(0.1)
        raise RuntimeError("the temporary Prefect server did not start: it did not answer within "
                           f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s "
                           f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)\n{self._tail()}")

    @contextlib.contextmanager
    def ready(self):
        """Wait for the server, then run the block against it; drain this process's log and event
        queues at its end (the server stops later, in `stop`)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        if not _wanted():  # Prefect's settings name a server after all
            self.stop()
            yield
            return
        self.wait()
        with temporary_settings({PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                _drain_clients()

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after 5 s, as Prefect stops its own)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.output.close()


def _wanted() -> bool:
    """Whether a command-line run needs its own server: not when PREFECT_API_URL names one (or a
    test harness's), nor when Prefect's temporary server is switched off. Before Prefect is
    imported (~2 s) only the environment is asked; `TemporaryServer.ready()` asks Prefect's
    settings (a profile may name a server) and stops the server it does not need."""
    if "prefect.settings" not in sys.modules:
        return not os.environ.get("PREFECT_API_URL")
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()


class _NoServer:
    """Stands in for TemporaryServer where Prefect already has a server."""

    @contextlib.contextmanager
    def ready(self):
        yield

    def stop(self) -> None:
        pass


@contextlib.contextmanager
def launch_server():
    """Start the temporary server now and yield it (a TemporaryServer, or a stand-in that does
    nothing where PREFECT_API_URL names a server); it is stopped when the block ends, however."""
    server = TemporaryServer() if _wanted() else _NoServer()
    try:
        yield server
    finally:
        server.stop()

