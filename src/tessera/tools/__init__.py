"""Tools that show what Tessera did: profiler, accuracy comparison, graph viewer,
migration of PyTorch scripts, op scaffolding. They sit on top of every other layer."""
