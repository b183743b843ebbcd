"""`tessera bench`: Tessera against its baselines, timed interleaved in one process.

A suite is a module with `cases(quick: bool) -> list[Case]`, registered in `SUITES` and
imported only when run; a suite that must time in processes of its own (comm: one per rank)
has `rows(quick: bool, ranks: int)` instead, returning finished rows. See ARCHITECTURE.md
for the JSON format.
"""

from tessera.bench.runner import SUITES, BenchError, Case, available, run

__all__ = ["SUITES", "BenchError", "Case", "available", "run"]
