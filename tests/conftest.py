from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["tokensaver.testing"]


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Plugins' disk stores (memoize, summaries, kept originals) go to a temporary dir, never ~/.cache."""
    monkeypatch.setenv("TOKENSAVER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
