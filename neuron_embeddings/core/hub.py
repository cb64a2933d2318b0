"""Is the Hugging Face Hub reachable? Decided in about a second, before any Hub client is imported,
so that a Hub model or dataset name fails at once offline instead of after the clients' retries
(~50 s for a model, ~30 s for a dataset).

The Hub counts as unreachable when `HF_HUB_OFFLINE` is set, or when a TCP connection to its host
(`HF_ENDPOINT`, default huggingface.co) fails within `PROBE_S` seconds. With an HTTP(S) proxy
configured the probe is skipped (the proxy may be the only way out) and the clients decide.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from neuron_embeddings.core.errors import UserError

PROBE_S = 2.0  # a TCP handshake slower than this: treated as no network
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
LOCAL_MODELS = ("a local model directory, builtin:all-MiniLM-L6-v2 or builtin:smollm2-135m (offline), or a "
                "random-weight GPT-2 saved by neuron_embeddings.core.synthetic.build_random_gpt2(DIR)")
LOCAL_DATASETS = "a local .txt/.jsonl/.parquet file or builtin:python-docs"
_PROBED: dict[tuple[str, int], str | None] = {}


def offline_reason(timeout: float = PROBE_S) -> str | None:
    """Why the Hub cannot be reached ("HF_HUB_OFFLINE is set", "huggingface.co is unreachable: ..."),
    or None when it can (or a proxy decides)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    if (host, port) not in _PROBED:  # once per process
        _PROBED[(host, port)] = _probe(host, port, timeout)
    return _PROBED[(host, port)]


def _probe(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds (name lookup included:
    it runs in a thread, so a hanging resolver cannot hold us longer), else the reason."""
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host} is unreachable: {e.strerror or e}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"{host} is unreachable: no answer in {timeout:g} s"


def cached_model(name: str) -> bool:
    """Whether the Hugging Face cache already holds model `name`'s config (then it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a name the Hub would refuse: not cached
        return False


def require_hub(what: str, local: str) -> None:
    """Raise a one-line UserError now if the Hub cannot be reached: `what` needs it (e.g. "--model
    gpt2"), `local` names what to use instead."""
    reason = offline_reason()
    if reason:
        raise UserError(f"{what} needs the Hugging Face Hub, which cannot be reached ({reason}); use {local}")


def require_model(name: str) -> None:
    """Check at once that model `name` can be loaded as far as the Hub goes: a builtin, an existing
    path and a model in the Hugging Face cache need no Hub; any other name does."""
    if name.lower().startswith("builtin:") or Path(name).expanduser().exists() or cached_model(name):
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a Hub id: the loader says so
        return
    require_hub(f"--model {name}", LOCAL_MODELS)


def check_sources(model: str, dataset: str) -> None:
    """The checks of a run's model and dataset names that load neither (a missing file, a Hub name
    while the Hub is unreachable, ...): UserError at once. Light: no torch, no Hub client."""
    from neuron_embeddings.core.datasets import check_dataset  # it imports this module

    check_dataset(dataset)
    require_model(model)
