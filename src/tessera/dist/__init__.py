"""tessera.dist: collective communication for processes on one or many machines.

    import tessera.dist as tdist
    comm = tdist.init()                       # from mpirun, torchrun, or one process
    y = comm.allreduce(x)                     # numpy arrays or CPU torch tensors
    comm.allreduce(x, op="max", out=x)        # in place
    work = comm.alltoallv(x, counts, async_op=True); ...; y = work.wait()

Inside a node ranks talk through one shared-memory segment (flag-based one-shot protocol
for small messages, chunked reduce-scatter + all-gather for large ones, reductions in C);
across nodes through MPI or torch.distributed's gloo. `import tessera.dist` also registers
the `tessera` backend of torch.distributed.
"""

from tessera.dist.comm import OPS, Communicator, Work
from tessera.dist.group import finalize, get_world, init, init_from_store, is_initialized
from tessera.errors import CommError, CommTimeoutError

__all__ = ["OPS", "CommError", "CommTimeoutError", "Communicator", "Work", "finalize",
           "get_world", "init", "init_from_store", "is_initialized"]
