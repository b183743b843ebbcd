"""tessera.dist: collective communication for processes on one or many machines.

    import tessera.dist as tdist
    comm = tdist.init()                       # from mpirun, torchrun, or one process
    y = comm.allreduce(x)                     # numpy arrays or CPU torch tensors
    comm.allreduce(x, op="max", out=x)        # in place
    work = comm.alltoallv(x, counts, async_op=True); ...; y = work.wait()

Inside a node ranks talk through one shared-memory segment (flag-based one-shot protocol
for small messages, chunked reduce-scatter + all-gather for large ones, reductions in C);
across nodes through MPI or torch.distributed's gloo. MoE expert parallelism:
`dispatch`/`combine`. torch.distributed's `tessera` backend is registered by
`import tessera.dist.torch_backend`, and by `import tessera.dist` once torch is imported.
"""

import sys
from typing import Any

from tessera.dist.comm import OPS, Communicator, Work
from tessera.dist.group import finalize, get_world, init, init_from_store, is_initialized
from tessera.errors import CommError, CommTimeoutError

__all__ = ["OPS", "CommError", "CommTimeoutError", "Communicator", "DispatchHandle", "Work",
           "combine", "dispatch", "finalize", "get_world", "init", "init_from_store",
           "is_initialized"]

_MOE = ("DispatchHandle", "combine", "dispatch")

if "torch" in sys.modules:  # never import torch for numpy-only users
    from tessera.dist import torch_backend  # noqa: F401  (registers the backend)


def __getattr__(name: str) -> Any:
    """The MoE helpers need torch: import them on first use."""
    if name in _MOE:
        from tessera.dist import moe

        return getattr(moe, name)
    raise AttributeError(f"module 'tessera.dist' has no attribute {name!r}")
