"""Whether the Hugging Face hub can be reached, decided at once.

Without a network, huggingface_hub retries every request for ≈ 20 s (5 retries, backoff 1–8 s) before it gives up,
and transformers and timm ask for several files: an offline machine (a cluster's compute node) waited 23–46 s for
the one-line "not cached and cannot be downloaded". Loaders therefore look in the cache first and go online only
when this says the hub may be reachable.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_reason() -> str | None:
    """Why the hub cannot be reached (HF_HUB_OFFLINE, or its host name does not resolve), or None when it may be."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not endpoint_resolves(constants.ENDPOINT):
        return f"{constants.ENDPOINT} does not resolve"
    return None


def endpoint_resolves(url: str) -> bool:
    """Whether the host name of `url` resolves (always true behind a proxy, which resolves it itself)."""
    if any(os.environ.get(k) for k in PROXY_VARS):
        return True
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
        return True
    except OSError:
        return False


class HubUnreachable(OSError):
    """Not in the cache, and the hub cannot be reached (the message says why)."""


def cache_first(load):
    """`load(local_files_only=...)` (a transformers `from_pretrained`): from a local folder or the cache first, online
    only when the hub may be reachable; HubUnreachable otherwise."""
    try:
        return load(local_files_only=True)
    except OSError:
        reason = offline_reason()
        if reason is not None:
            raise HubUnreachable(reason) from None
    return load(local_files_only=False)
