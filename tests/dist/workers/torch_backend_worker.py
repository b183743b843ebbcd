"""One torchrun rank of tests/dist/test_torch_backend.py: runs every check against the
`tessera` torch.distributed backend and writes {check: "ok" | failure} to
<outdir>/rank<R>.json after each check, so a hang still leaves the earlier results.

Every rank can build every rank's input from (check name, rank), so each compares its
results with a reference computed locally, exactly (inputs are small integers, which every
dtype and op here represents without rounding).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

R = dist.ReduceOp
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
OPS = {"sum": R.SUM, "max": R.MAX, "min": R.MIN, "prod": R.PRODUCT}
TIMEOUT = timedelta(seconds=60)

rank = -1  # set by main() from torchrun's environment
world = -1
outdir = Path()
results: dict[str, str] = {}
timings: dict[str, float] = {}


def record(name: str, fn: Callable[[], None]) -> None:
    """Run one check; keep going whatever it does (a failed check must not stop the rest
    from reporting), and flush the results file."""
    start = time.perf_counter()
    try:
        fn()
        results[name] = "ok"
    except BaseException as e:  # reported below, not swallowed
        results[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    timings[name] = round(time.perf_counter() - start, 4)
    (outdir / f"rank{rank}.json").write_text(json.dumps({"results": results,
                                                         "seconds": timings}, indent=1))


def gen(tag: str, r: int, shape: tuple[int, ...], dtype: torch.dtype,
        op: str = "sum") -> torch.Tensor:
    """Rank r's input for check `tag`: small integers (in {-1, 1, 2} for products)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{tag}/{r}".encode()))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if op == "prod":
        vals = torch.tensor([-1, 1, 2])
        return vals[torch.randint(0, 3, shape, generator=g)].to(dtype)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def reduce_ref(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    """The reduction of xs, computed exactly in float64 and cast back."""
    s = torch.stack([x.double() for x in xs])
    out = {"sum": s.sum(0), "prod": s.prod(0), "max": s.amax(0), "min": s.amin(0),
           "avg": s.sum(0) / len(xs)}[op]
    return out.to(xs[0].dtype)


def same(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        diff = "" if got.shape != want.shape else (got.double() - want.double()).abs().max()
        raise AssertionError(f"{what} mismatch: got {got.dtype} {tuple(got.shape)}, want "
                             f"{want.dtype} {tuple(want.shape)}; max diff {diff}")


# ------------------------------------------------------------------------- checks


def check_backend() -> None:
    assert dist.get_backend() == "tessera", dist.get_backend()
    pg = dist.group.WORLD
    assert type(pg).__name__ == "TesseraProcessGroup", type(pg)
    assert pg.name() == "tessera" and pg.rank() == rank and pg.size() == world


def all_reduce_case(dtype: torch.dtype, op: str, shape: tuple[int, ...]) -> Callable[[], None]:
    def run() -> None:
        tag = f"ar/{dtype}/{op}/{shape}"
        xs = [gen(tag, r, shape, dtype, op) for r in range(world)]
        t = xs[rank].clone()
        dist.all_reduce(t, op=R.AVG if op == "avg" else OPS[op])
        want = reduce_ref(xs, op) if op != "avg" or dtype.is_floating_point else \
            torch.div(torch.stack(xs).sum(0), world, rounding_mode="trunc").to(dtype)
        same(t, want, tag)
    return run


def check_all_reduce_layouts() -> None:
    # non-contiguous (a transposed view), 0-d, empty, and a widened dtype (int8 via int64)
    base = gen("nc", rank, (5, 7), torch.float32).t()
    dist.all_reduce(base)
    same(base, sum(gen("nc", r, (5, 7), torch.float32) for r in range(world)).t(), "noncontig")
    s = torch.tensor(float(rank + 1))
    dist.all_reduce(s, op=R.MAX)
    same(s, torch.tensor(float(world)), "0-d")
    e = torch.empty(0, 3)
    dist.all_reduce(e)
    assert e.shape == (0, 3)
    i8 = gen("i8", rank, (9,), torch.int8)
    dist.all_reduce(i8, op=R.MIN)
    same(i8, reduce_ref([gen("i8", r, (9,), torch.int8) for r in range(world)], "min"), "int8")
    b = torch.tensor([rank == 0, False, True])
    dist.all_reduce(b, op=R.MAX)  # logical or
    same(b, torch.tensor([True, False, True]), "bool")
    c = torch.complex(gen("cr", rank, (6,), torch.float32), gen("ci", rank, (6,), torch.float32))
    dist.all_reduce(c)
    want = sum(torch.complex(gen("cr", r, (6,), torch.float32), gen("ci", r, (6,), torch.float32))
               for r in range(world))
    same(c, want, "complex")


def check_all_reduce_large() -> None:
    # 1.5 MiB of float32: more than one 1 MiB shared-memory slot, so the chunked path runs
    n = (3 << 19) // 4 + 17
    xs = [gen("big", r, (n,), torch.float32) for r in range(world)]
    t = xs[rank].clone()
    dist.all_reduce(t)
    same(t, reduce_ref(xs, "sum"), "large")


def check_broadcast() -> None:
    for root in range(world):
        for dtype in [*DTYPES, torch.bool, torch.float64]:
            tag = f"bc/{root}/{dtype}"
            t = gen(tag, rank, (3, 11), dtype)
            dist.broadcast(t, src=root)
            same(t, gen(tag, root, (3, 11), dtype), tag)
    nc = torch.zeros(6, 4).t()  # non-contiguous destination
    if rank == world - 1:
        nc.copy_(torch.arange(24.0).view(4, 6))
    dist.broadcast(nc, src=world - 1)
    same(nc, torch.arange(24.0).view(4, 6), "noncontig")


def check_reduce() -> None:
    for op in ["sum", "max"]:
        root = world - 1
        tag = f"red/{op}"
        xs = [gen(tag, r, (13,), torch.float32) for r in range(world)]
        t = xs[rank].clone()
        dist.reduce(t, dst=root, op=OPS[op])
        same(t, reduce_ref(xs, op) if rank == root else xs[rank], tag)


def check_all_gather_list(dtype: torch.dtype) -> Callable[[], None]:
    def run() -> None:
        tag = f"ag/{dtype}"
        outs = [torch.empty(4, 3, dtype=dtype) for _ in range(world)]
        dist.all_gather(outs, gen(tag, rank, (4, 3), dtype))
        for r in range(world):
            same(outs[r], gen(tag, r, (4, 3), dtype), f"{tag} from {r}")
    return run


def check_all_gather_uneven() -> None:
    # int64 natively (complex64 too: torch views it as float32), int16 and bool as bytes
    # (counts scaled by the element size)
    shape = lambda r: (r + 1, 2)
    for dtype in [torch.int64, torch.complex64, torch.int16, torch.bool]:
        tag = f"agu/{dtype}"
        make = lambda r, tag=tag, dtype=dtype: (
            torch.complex(gen(tag, r, shape(r), torch.float32), gen(tag + "i", r, shape(r),
                                                                    torch.float32))
            if dtype.is_complex else gen(tag, r, shape(r), dtype))
        outs = [torch.zeros(shape(r), dtype=dtype) for r in range(world)]
        dist.all_gather(outs, make(rank))
        for r in range(world):
            same(outs[r], make(r), f"{tag} from {r}")


def check_all_gather_into_tensor() -> None:
    for dtype in [*DTYPES, torch.bool]:
        tag = f"agt/{dtype}"
        inp = gen(tag, rank, (5,), dtype)
        want = torch.cat([gen(tag, r, (5,), dtype) for r in range(world)])
        flat = torch.empty(world * 5, dtype=dtype)
        dist.all_gather_into_tensor(flat, inp)
        same(flat, want, f"{tag} concat")
        stacked = torch.empty(world, 5, dtype=dtype)
        dist.all_gather_into_tensor(stacked, inp)
        same(stacked, want.view(world, 5), f"{tag} stack")


def reduce_scatter_case(dtype: torch.dtype, op: str) -> Callable[[], None]:
    def run() -> None:
        tag = f"rs/{dtype}/{op}"
        n = 7
        xs = [gen(tag, r, (world * n,), dtype, op) for r in range(world)]
        want = reduce_ref(xs, op)[rank * n:(rank + 1) * n]
        out = torch.empty(n, dtype=dtype)
        dist.reduce_scatter_tensor(out, xs[rank], op=OPS[op])
        same(out, want, f"{tag} tensor")
        out2 = torch.empty(n, dtype=dtype)
        dist.reduce_scatter(out2, list(xs[rank].chunk(world)), op=OPS[op])
        same(out2, want, f"{tag} list")
        same(xs[rank], gen(tag, rank, (world * n,), dtype, op), f"{tag} input untouched")
    return run


def check_reduce_scatter_uneven_avg() -> None:
    sizes = [r + 2 for r in range(world)]
    xs = [gen("rsu", r, (sum(sizes),), torch.float32) for r in range(world)]
    out = torch.empty(sizes[rank])
    dist.reduce_scatter(out, list(xs[rank].split(sizes)), op=R.AVG)
    start = sum(sizes[:rank])
    same(out, reduce_ref(xs, "avg")[start:start + sizes[rank]], "uneven avg")
    out = torch.empty(3, 2)  # 2-d blocks through the flat form
    x2 = [gen("rs2", r, (3 * world, 2), torch.float32) for r in range(world)]
    dist.reduce_scatter_tensor(out, x2[rank], op=R.MIN)
    same(out, reduce_ref(x2, "min")[3 * rank:3 * rank + 3], "2-d")


def check_all_to_all_single() -> None:
    for dtype in [torch.float32, torch.bfloat16, torch.int64, torch.bool]:
        tag = f"a2a/{dtype}"
        n = 3
        xs = [gen(tag, r, (world * n, 2), dtype) for r in range(world)]
        out = torch.empty(world * n, 2, dtype=dtype)
        dist.all_to_all_single(out, xs[rank])
        want = torch.cat([xs[r][rank * n:(rank + 1) * n] for r in range(world)])
        same(out, want, tag)
        same(xs[rank], gen(tag, rank, (world * n, 2), dtype), f"{tag} input untouched")


def check_all_to_all_single_splits() -> None:
    # rank r sends (r + i) % 3 rows of 2 columns to rank i (some zero)
    count = lambda src, dst: (src + dst) % 3
    xs = [gen("a2av", r, (sum(count(r, i) for i in range(world)), 2), torch.float32)
          for r in range(world)]
    send = [count(rank, i) for i in range(world)]
    recv = [count(j, rank) for j in range(world)]
    out = torch.empty(sum(recv), 2)
    dist.all_to_all_single(out, xs[rank], output_split_sizes=recv, input_split_sizes=send)
    want = torch.cat([xs[j].split([count(j, i) for i in range(world)])[rank]
                      for j in range(world)])
    same(out, want, "splits")


def check_all_to_all_single_mixed_splits() -> None:
    # rank 0's splits happen to be even ([2] * world both ways), the others' are not: every
    # rank must still take the same path through the communicator
    count = lambda src, dst: 2 if 0 in (src, dst) else 1 + (src + dst) % 2
    xs = [gen("a2am", r, (sum(count(r, i) for i in range(world)), 3), torch.float32)
          for r in range(world)]
    send = [count(rank, i) for i in range(world)]
    recv = [count(j, rank) for j in range(world)]
    out = torch.empty(sum(recv), 3)
    dist.all_to_all_single(out, xs[rank], output_split_sizes=recv, input_split_sizes=send)
    want = torch.cat([xs[j].split([count(j, i) for i in range(world)])[rank]
                      for j in range(world)])
    same(out, want, "mixed splits")
    outs = [torch.empty(count(j, rank), 3) for j in range(world)]
    dist.all_to_all(outs, list(xs[rank].split(send)))
    for j in range(world):
        same(outs[j], xs[j].split([count(j, i) for i in range(world)])[rank], f"list {j}")


def check_all_to_all_list() -> None:
    # uneven blocks, natively (int32) and as bytes (bool, int16)
    shape = lambda src, dst: (src + 2 * dst + 1,)
    for dtype in [torch.int32, torch.bool, torch.int16]:
        tag = f"a2al/{dtype}"
        ins = [gen(f"{tag}/{rank}->{i}", 0, shape(rank, i), dtype) for i in range(world)]
        outs = [torch.zeros(shape(j, rank), dtype=dtype) for j in range(world)]
        dist.all_to_all(outs, ins)
        for j in range(world):
            same(outs[j], gen(f"{tag}/{j}->{rank}", 0, shape(j, rank), dtype), f"{tag} {j}")


def check_barrier() -> None:
    for _ in range(3):
        dist.barrier()
    w = dist.barrier(async_op=True)
    w.wait()


def check_async() -> None:
    xs = [[gen(f"as{k}", r, (257,), torch.float32) for r in range(world)] for k in range(3)]
    ts = [x[rank].clone() for x in xs]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    outs = [torch.empty(4, dtype=torch.int64) for _ in range(world)]
    wg = dist.all_gather(outs, torch.full((4,), rank, dtype=torch.int64), async_op=True)
    sc = torch.empty(2)
    ws = dist.reduce_scatter_tensor(sc, torch.arange(2.0 * world), async_op=True)
    for w in works:
        assert w.wait() in (True, None)
    for k in range(3):
        same(ts[k], reduce_ref(xs[k], "sum"), f"async allreduce {k}")
    fut = wg.get_future()
    fut.wait()
    assert wg.is_completed()
    for r in range(world):
        same(outs[r], torch.full((4,), r, dtype=torch.int64), "async allgather")
    ws.wait()
    same(sc, torch.arange(2.0 * rank, 2.0 * rank + 2) * world, "async reduce_scatter")
    # the future resolves to the output tensors, as with gloo
    t = torch.ones(3)
    value = dist.all_reduce(t, async_op=True).get_future().wait()
    same(value[0], torch.full((3,), float(world)), "future value")


def check_send_recv() -> None:
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    buf = torch.empty(10, dtype=torch.int64)
    ws = dist.isend(torch.arange(10) + 100 * rank, nxt, tag=3)
    wr = dist.irecv(buf, prv, tag=3)
    ws.wait()
    wr.wait()
    same(buf, torch.arange(10) + 100 * prv, "ring")
    # batch_isend_irecv (pipeline-parallel style): both directions of the ring at once
    left, right = torch.empty(3), torch.empty(3)
    ops = [dist.P2POp(dist.isend, torch.full((3,), float(rank)), nxt),
           dist.P2POp(dist.isend, torch.full((3,), float(rank)), prv),
           dist.P2POp(dist.irecv, left, prv),
           dist.P2POp(dist.irecv, right, nxt)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    same(left, torch.full((3,), float(prv)), "batch from left")
    same(right, torch.full((3,), float(nxt)), "batch from right")
    if rank == 0:
        dist.send(torch.tensor([1.5, 2.5]), dst=world - 1)
    elif rank == world - 1:
        got = torch.empty(2)
        dist.recv(got, src=0)
        same(got, torch.tensor([1.5, 2.5]), "blocking")


def check_gather_scatter() -> None:
    root = world - 1
    inp = gen("ga", rank, (3,), torch.float32)
    gl = [torch.empty(3) for _ in range(world)] if rank == root else None
    dist.gather(inp, gl, dst=root)
    if rank == root:
        for r in range(world):
            same(gl[r], gen("ga", r, (3,), torch.float32), f"gather from {r}")
    out = torch.empty(2, dtype=torch.int64)
    sl = [torch.tensor([10 * r, 10 * r + 1]) for r in range(world)] if rank == 0 else None
    dist.scatter(out, sl, src=0)
    same(out, torch.tensor([10 * rank, 10 * rank + 1]), "scatter")


def check_objects() -> None:
    objs: list = [None] * world
    dist.all_gather_object(objs, {"rank": rank, "pad": "x" * rank})
    assert objs == [{"rank": r, "pad": "x" * r} for r in range(world)], objs
    lst = [rank, "payload"] if rank == 0 else [None, None]
    dist.broadcast_object_list(lst, src=0)
    assert lst == [0, "payload"], lst


def check_new_group() -> None:
    members = [r for r in range(world) if r % 2 == 1] if world > 2 else [0, 1]
    g = dist.new_group(members)
    other = dist.new_group([r for r in range(world) if r not in members]) if world > 2 else None
    if rank not in members:
        assert g == dist.GroupMember.NON_GROUP_MEMBER
        assert other is not None
        t = torch.ones(4)
        dist.all_reduce(t, group=other)
        same(t, torch.full((4,), float(world - len(members))), "complement group")
        return
    grank = dist.get_group_rank(g, rank)
    assert g.size() == len(members) and g.rank() == grank
    xs = {r: gen("ng", r, (6,), torch.int32) for r in members}
    t = xs[rank].clone()
    dist.all_reduce(t, group=g)
    same(t, reduce_ref(list(xs.values()), "sum"), "group all_reduce")
    outs = [torch.empty(6, dtype=torch.int32) for _ in members]
    dist.all_gather(outs, xs[rank], group=g)
    for i, r in enumerate(members):
        same(outs[i], xs[r], f"group all_gather {r}")
    b = xs[rank].clone()
    dist.broadcast(b, src=members[-1], group=g)  # global rank, mapped by torch
    same(b, xs[members[-1]], "group broadcast")
    dist.barrier(group=g)


def check_bad_ops() -> None:
    from tessera.errors import TesseraError

    for op in [R.BAND, R.BXOR, dist._make_nccl_premul_sum(2.0)]:
        t = torch.ones(3)
        try:
            dist.all_reduce(t, op=op)
        except TesseraError as e:
            assert "not supported" in str(e) and e.hint, str(e)
            assert isinstance(e, RuntimeError)
        else:
            raise AssertionError(f"{op} did not raise")
    try:
        dist.all_reduce(torch.ones(2, dtype=torch.bool), op=R.AVG)
    except TesseraError as e:
        assert "bool" in str(e)
    else:
        raise AssertionError("AVG of bool did not raise")
    # the group still works after the refused calls
    t = torch.ones(2)
    dist.all_reduce(t)
    same(t, torch.full((2,), float(world)), "after errors")


def check_ddp() -> None:
    """DDP unchanged: it broadcasts rank 0's parameters and averages gradients, both from
    C++ through torch's ProcessGroup trampoline."""
    torch.manual_seed(rank)  # different initial weights per rank
    model = torch.nn.Linear(4, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    same(model.weight.detach(), ref.weight.detach(), "parameters broadcast from rank 0")
    x = gen("ddp", rank, (5, 4), torch.float32)
    ddp(x).sum().backward()
    grads = []
    for r in range(world):
        ref.zero_grad()
        ref(gen("ddp", r, (5, 4), torch.float32)).sum().backward()
        grads.append(ref.weight.grad.clone())
    want = torch.stack(grads).mean(0)
    torch.testing.assert_close(model.weight.grad, want)


def check_functional() -> None:
    import torch.distributed._functional_collectives as funcol

    t = gen("fc", rank, (8,), torch.float32)
    out = funcol.all_reduce(t, "sum", dist.group.WORLD)
    same(torch.as_tensor(out).clone(), reduce_ref([gen("fc", r, (8,), torch.float32)
                                                    for r in range(world)], "sum"), "funcol")


def check_tcp_reinit() -> None:
    """destroy_process_group, then init again through tcp:// with explicit rank/size."""
    port = [None]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port[0] = s.getsockname()[1]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    assert not dist.is_initialized()
    # torchrun makes every tcp:// rendezvous a client of its own store; outside torchrun
    # rank 0 serves the store, which is the path this checks
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    dist.init_process_group("tessera", init_method=f"tcp://127.0.0.1:{port[0]}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    t = torch.full((3,), float(rank))
    dist.all_reduce(t)
    same(t, torch.full((3,), float(sum(range(world)))), "after tcp re-init")


def checks(nranks: int) -> list[tuple[str, Callable[[], None]]]:
    """Every check for a job of `nranks`, in the order all ranks run them (the test file
    lists them by name). DDP runs at 2 ranks only: its constructor imports torch._dynamo,
    seconds of CPU per rank."""
    out: list[tuple[str, Callable[[], None]]] = [("backend", check_backend)]
    for dtype in DTYPES:
        for op in OPS:
            out.append((f"all_reduce/{dtype}/{op}", all_reduce_case(dtype, op, (3, 37))))
    for dtype in [torch.float32, torch.bfloat16, torch.int32]:
        out.append((f"all_reduce/{dtype}/avg", all_reduce_case(dtype, "avg", (41,))))
    out += [("all_reduce/layouts", check_all_reduce_layouts),
            ("all_reduce/large", check_all_reduce_large),
            ("broadcast", check_broadcast),
            ("reduce", check_reduce)]
    out += [(f"all_gather/{dtype}", check_all_gather_list(dtype)) for dtype in DTYPES]
    out += [("all_gather/uneven", check_all_gather_uneven),
            ("all_gather_into_tensor", check_all_gather_into_tensor)]
    for dtype in DTYPES:
        for op in OPS:
            out.append((f"reduce_scatter/{dtype}/{op}", reduce_scatter_case(dtype, op)))
    out += [("reduce_scatter/uneven_avg_2d", check_reduce_scatter_uneven_avg),
            ("all_to_all_single/even", check_all_to_all_single),
            ("all_to_all_single/splits", check_all_to_all_single_splits),
            ("all_to_all_single/mixed_splits", check_all_to_all_single_mixed_splits),
            ("all_to_all/list", check_all_to_all_list),
            ("barrier", check_barrier),
            ("async", check_async),
            ("send_recv", check_send_recv),
            ("gather_scatter", check_gather_scatter),
            ("objects", check_objects),
            ("new_group", check_new_group),
            ("bad_op", check_bad_ops),
            ("functional", check_functional),
            ("tcp_reinit", check_tcp_reinit)]
    if nranks == 2:
        out.insert(-1, ("ddp", check_ddp))
    return out


def main() -> None:
    global rank, world, outdir
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    outdir = Path(sys.argv[1])
    warnings.simplefilter("ignore")  # deprecation notes from torch's own helpers
    import tessera.dist.torch_backend  # noqa: F401 (registers the backend)

    dist.init_process_group("tessera", timeout=TIMEOUT)
    for name, fn in checks(world):
        record(name, fn)
    dist.destroy_process_group()
    record("done", lambda: None)


if __name__ == "__main__":
    main()
