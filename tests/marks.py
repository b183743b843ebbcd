"""Parameter lists whose tail only `make test` runs: `make test-quick` (-m "not slow") keeps
the first few values, enough to cover the feature day to day."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def slow_after(n: int, values: Iterable[Any]) -> list[Any]:
    """`values` for pytest.mark.parametrize, those after the first `n` marked slow."""
    return [v if i < n else pytest.param(v, marks=pytest.mark.slow)
            for i, v in enumerate(values)]
