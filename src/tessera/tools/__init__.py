"""Tools that show what Tessera did: profiler, accuracy comparison, graph viewer,
migration of PyTorch scripts, op scaffolding. They sit on top of every other layer.

`tessera.tools.compare(model, inputs)` and `compare_dumps(a, b)` are the comparison's
entry points (the module is `tessera.tools.compare` for everything else in it)."""

from tessera.tools.compare import compare, compare_dumps

__all__ = ["compare", "compare_dumps"]
