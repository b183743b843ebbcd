"""`tessera bench`: Tessera against its baselines, timed interleaved in one process.

A suite is a module with `cases(quick: bool) -> list[Case]`, registered in `SUITES` and
imported only when run. See ARCHITECTURE.md for the JSON format.
"""

from tessera.bench.runner import SUITES, BenchError, Case, available, run

__all__ = ["SUITES", "BenchError", "Case", "available", "run"]
