"""tessera.ops pointwise, softmax and normalization cases: small shapes (32x384, where the
per-call cost decides) and large ones (8192x4096, where bandwidth does), and the bare
per-call cost of a 16-element op."""

from __future__ import annotations

from tessera.bench.cases import op_case
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
    out.append(op_case("add_16", O.add, torch.add, (tiny, tiny), quick, bytes_moved=3 * 16 * 4,
                       meta={"note": "per-call cost: 16 floats"}))
    for m, n in ((32, 384), (256, 1024) if quick else (8192, 4096)):
        x, y = torch.randn(m, n), torch.randn(m, n)
        w, b = torch.randn(n), torch.randn(n)
        io = 8 * m * n
        out += [
            op_case(f"gelu_{m}x{n}", O.gelu, F.gelu, (x,), quick, bytes_moved=io),
            op_case(f"add_{m}x{n}", O.add, torch.add, (x, y), quick, bytes_moved=12 * m * n),
            op_case(f"softmax_{m}x{n}", O.softmax, lambda t: torch.softmax(t, -1), (x,), quick,
                    bytes_moved=io),
            op_case(f"layer_norm_{m}x{n}", O.layer_norm,
                    lambda t, w, b: F.layer_norm(t, t.shape[-1:], w, b), (x, w, b), quick,
                    ours_args=(x, [n], w, b), bytes_moved=io),
            op_case(f"rms_norm_{m}x{n}", O.rms_norm,
                    lambda t, w: F.rms_norm(t, t.shape[-1:], w, 1e-6), (x, w), quick,
                    ours_args=(x, [n], w, 1e-6), bytes_moved=io),
        ]
    return out
