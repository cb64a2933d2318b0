"""The temporary Prefect server of a command-line run, which dies with the process that started it.

Without PREFECT_API_URL, Prefect starts a temporary server in a subprocess on first use and stops it
at exit; a run ended by SIGKILL (or SIGTERM under Prefect's default handling) left it running,
orphaned. `temporary_server()` starts the same server itself, from the calling thread, in a small
launcher that dies with its parent process (Linux: PR_SET_PDEATHSIG; elsewhere a thread polling
the parent's pid), sends the server's own output to a file (its shutdown tracebacks do not reach
the terminal), and on exit drains this process's log and event queues before stopping it.
Dask's worker processes already die with their parent (distributed's parent-alive pipe).
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile

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


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class _Server(SubprocessASGIServer):
        """Prefect's temporary server (same command and settings), started through `_LAUNCHER`."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            self.output = tempfile.TemporaryFile()
            args = ["--app-dir", str(prefect.__module_path__.parent), "--factory", "prefect.server.api.server:create_app",
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            # its own session: a terminal's Ctrl-C reaches the run, which stops the server after its last report
            return subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(os.getpid()), *args], env=env,
                                    stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    return _Server


def _drain_clients() -> None:
    """Send this process's queued Prefect logs and events before the server goes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=5)
        except Exception as e:  # noqa: BLE001 - best effort at shutdown; the run's result is already decided
            log.debug("draining %s: %s", worker.__name__, e)


@contextlib.contextmanager
def temporary_server():
    """Run the block against a temporary Prefect server that dies with this process; nothing to do
    when PREFECT_API_URL names a server (or a test harness's)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    if (PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()
            or SubprocessASGIServer._instances.get(None) is not None):
        yield
        return
    server = _server_class()()  # registered as Prefect's default temporary server: it starts no other
    try:
        try:
            server.start()
        except Exception as e:
            output = getattr(server, "output", None)
            tail = b""
            if output is not None:
                output.seek(0)
                tail = output.read()[-2000:]
            raise RuntimeError(f"the temporary Prefect server did not start: {e}\n{tail.decode(errors='replace')}") from e
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield
            finally:
                _drain_clients()
    finally:
        server.stop()
