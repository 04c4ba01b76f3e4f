"""Whether the Hugging Face hub can be reached, asked once per process in a few seconds.

transformers and datasets retry an unreachable hub with backoff (measured: 51 s and 23 lines of warnings for
one hub target before the suite's own message), so models and datasets named by hub id ask here first and
fail, or fall back to the local cache, at once.
"""
from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 5.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_mode() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network (the environment, or
    huggingface_hub's own setting, which it reads from the environment once at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
                                           for name in OFFLINE_VARIABLES)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable() -> bool:
    """False in offline mode; else whether the hub's endpoint answered one HEAD request (asked once)."""
    return not offline_mode() and _endpoint_answers(endpoint())


@functools.cache
def _endpoint_answers(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer: reachable
    except (OSError, ValueError):
        return False
    return True


def why_unreachable() -> str:
    return "offline mode is set" if offline_mode() else f"no answer from {endpoint()}"


def cached_locally(repo_id: str, filename: str = "config.json") -> bool:
    """True when `filename` of model `repo_id` is in the local Hugging Face cache (loadable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False
