"""Seeds every test's random inputs, and prints which ops the OpInfo-driven test covered,
with sample counts (each test records its counts as a property, so this works under
pytest-xdist too)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tessera.ops import _fastpath


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Random inputs, the same on every run."""
    torch.manual_seed(0)


@pytest.fixture(params=["native", "python"])
def entry_path(request: pytest.FixtureRequest) -> Any:
    """Run the test through the native fast path (waiting for its build) and again with
    every op entry point bound to the Python path: the two must agree, bad input
    included, whenever the build finishes."""
    assert _fastpath.wait(timeout=600), "the native fast path did not build"
    if request.param == "native":
        yield request.param
    else:
        with _fastpath.suspended():
            yield request.param


def pytest_terminal_summary(terminalreporter: Any) -> None:
    counts = {}
    for reports in terminalreporter.stats.values():
        for r in reports:
            for key, value in getattr(r, "user_properties", ()):
                if key == "opinfo" and getattr(r, "when", "call") == "call":
                    counts[value[0]] = value[1]
    if not counts:
        return
    tr = terminalreporter
    tr.section("tessera.ops covered by PyTorch OpInfo samples (float32)")
    for info, c in sorted(counts.items()):
        tr.write_line(f"  {info:45s} -> {c['op']:14s} {c['compared']:4d} compared, "
                      f"{c['outside']:3d} outside the schema")
    tr.write_line(f"  {len(counts)} OpInfos, {len({c['op'] for c in counts.values()})} ops")
