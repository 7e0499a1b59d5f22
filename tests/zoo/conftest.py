"""Shared fixtures for the zoo tests: skip cleanly when a pinned archive is not fetched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from orthoreg.zoo import assets


@pytest.fixture
def require_asset() -> Callable[[str], Path]:
    """Return the verified archive path, or skip (missing) — a corrupted archive fails."""

    def need(name: str) -> Path:
        try:
            return assets.path(name)
        except assets.AssetMissing:
            pytest.skip(f"asset {name!r} not fetched: run `{assets.FETCH_COMMAND} {name}`")

    return need
