"""Weight-only quantization of a graph (`options={"quantize": "int8" | "int4"}`): every
product with a frozen float weight — linear, addmm and mm with a constant (or transposed
constant) right operand, and the expert weights of fused_moe — is rewritten to the
int8/int4 GEMM templates, the weights quantized once at compile time."""

from __future__ import annotations

from typing import Any

import torch

from tessera.errors import TesseraError
from tessera.graph.ir import Graph, Node, Value

__all__ = ["BITS", "quantize"]

BITS = {"int8": 8, "int4": 4}
GROUP = 128  # rows of K per scale (32 where K is smaller)


def _const_weight(g: Graph, v: Any) -> torch.Tensor | None:
    """The [K, N] float matrix a product's right operand holds, if it is frozen: a
    constant, or a transposed view of one."""
    if not isinstance(v, Value):
        return None
    if v.kind == "const" and v.data is not None and v.data.dim() == 2:
        return v.data
    n = v.producer
    if n is not None and n.op in ("view:t.default", "view:permute.default"):
        src = n.args["args"][0]
        if isinstance(src, Value) and src.kind == "const" and src.data is not None \
                and src.data.dim() == 2 and (n.op == "view:t.default"
                                             or list(n.args["args"][1]) == [1, 0]):
            return src.data.t()
    return None


def _quantized(g: Graph, w: torch.Tensor, bits: int, name: str) -> tuple[Value, Value]:
    from tessera.ops import quantize as q
    k = w.shape[-2]
    group = GROUP if k >= GROUP else 32
    data, scales = q(w.float().contiguous(), bits, group)
    return (g.value(f"{name}_q{bits}", data.dtype, tuple(data.shape), "const", data),
            g.value(f"{name}_scales", scales.dtype, tuple(scales.shape), "const", scales))


def quantize(g: Graph, mode: str) -> list[str]:
    """Rewrite `g` in place; the names of the weights quantized."""
    if mode not in BITS:
        raise TesseraError(f"quantize={mode!r}; it is 'int8' or 'int4'")
    bits, done = BITS[mode], []
    for i, n in enumerate(g.nodes):
        if n.op in ("addmm", "matmul", "linear"):
            x, w, bias = _operands(g, n)
            if w is None or not w.is_floating_point() or not isinstance(x, Value) or \
                    x.dtype != torch.float32 or w.shape[0] < 32:
                continue
            data, scales = _quantized(g, w, bits, n.outputs[0].name)
            node = Node("quantized_linear", {"x": x, "data": data, "scales": scales,
                                             "bias": bias}, n.outputs,
                        source=f"quantized ({mode}) from {n.source}").derive([n])
            g.nodes[i] = node
            for v in n.outputs:
                v.producer = node
            done.append(n.outputs[0].name)
        elif n.op == "fused_moe" and n.args.get("gate_up_scales") is None:
            up, down = n.args["w_gate_up"], n.args["w_down"]
            if isinstance(up, Value) and isinstance(down, Value) and up.kind == "const" \
                    and down.kind == "const":
                n.args["w_gate_up"], n.args["gate_up_scales"] = \
                    _quantized(g, up.data, bits, up.name)
                n.args["w_down"], n.args["down_scales"] = _quantized(g, down.data, bits,
                                                                    down.name)
                done.append(n.outputs[0].name)
    return done


def _operands(g: Graph, n: Node) -> tuple[Any, torch.Tensor | None, Any]:
    """(x, the frozen [K, N] weight or None, bias or None) of a product node x @ W (+ b)."""
    a = n.args
    if n.op == "linear":
        w = a["weight"]
        frozen = isinstance(w, Value) and w.kind == "const" and w.data is not None \
            and w.data.dim() == 2
        return a["x"], w.data.t() if frozen else None, a.get("bias")
    if n.op == "addmm":
        bias = a["input"]
        plain = a.get("beta", 1) == 1 and a.get("alpha", 1) == 1 and \
            isinstance(bias, Value) and len(bias.shape) == 1
        return a["mat1"], _const_weight(g, a["mat2"]) if plain else None, bias
    return a["x"], _const_weight(g, a["other"]), None
