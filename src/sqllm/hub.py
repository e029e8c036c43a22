"""Whether the Hugging Face hub can be reached, decided at once.

Without this, a hub id or a dataset name on a machine without network retries for half a minute and
prints a line per retry before its error.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_mode() -> str | None:
    """The environment variable that switches the hub off (Hugging Face libraries then use their caches
    only, and fail at once), or None."""
    return next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v, "").upper() in _TRUE),
                None)


def offline_reason(timeout: float = 3.0) -> str | None:
    """None when the hub may be reachable; otherwise why it is not (offline mode set, or no connection to
    its host within ``timeout`` seconds). Behind a proxy the probe is left to the download itself."""
    var = offline_mode()
    if var:
        return f"is switched off ({var} is set)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot be reached from here ({host}: {exc.strerror or type(exc).__name__})"
    return None


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model already downloaded (with its config.json), else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None
