"""tessera.ops pointwise, softmax and normalization cases: small shapes (32x384, where the
per-call cost decides) and large ones (8192x4096, where bandwidth does), and the bare
per-call cost of a 16-element op."""

from __future__ import annotations

from tessera.bench.cases import torch_case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import tessera.ops as O
    from tessera.ops import _fastpath

    _fastpath.wait()  # time the native path, not the Python one it replaces when ready
    torch.manual_seed(0)
    out: list[Case] = []
    tiny = torch.randn(16)
    out.append(torch_case("add_16", lambda: O.add(tiny, tiny), torch.add, (tiny, tiny), quick,
                          bytes_moved=3 * 16 * 4,
                          meta={"note": "per-call cost: 16 floats"}))
    for m, n in ((32, 384), (256, 1024) if quick else (8192, 4096)):
        x, y = torch.randn(m, n), torch.randn(m, n)
        w, b = torch.randn(n), torch.randn(n)
        io = 8 * m * n
        out += [
            torch_case(f"gelu_{m}x{n}", lambda x=x: O.gelu(x), F.gelu, (x,), quick,
                       bytes_moved=io),
            torch_case(f"add_{m}x{n}", lambda x=x, y=y: O.add(x, y), torch.add, (x, y), quick,
                       bytes_moved=12 * m * n),
            torch_case(f"softmax_{m}x{n}", lambda x=x: O.softmax(x),
                       lambda t: torch.softmax(t, -1), (x,), quick, bytes_moved=io),
            torch_case(f"layer_norm_{m}x{n}", lambda x=x, w=w, b=b, s=[n]: O.layer_norm(x, s, w, b),
                       lambda t, w, b: F.layer_norm(t, t.shape[-1:], w, b), (x, w, b), quick,
                       bytes_moved=io),
            torch_case(f"rms_norm_{m}x{n}", lambda x=x, w=w, s=[n]: O.rms_norm(x, s, w, 1e-6),
                       lambda t, w: F.rms_norm(t, t.shape[-1:], w, 1e-6), (x, w), quick,
                       bytes_moved=io),
        ]
    return out
