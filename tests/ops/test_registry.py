"""The registry: every op is fully described, callable as torch.ops.tessera.*, traceable by
torch.compile and torch.export through its fake implementation, and documented in
docs/ops.md exactly as the registry says."""

from __future__ import annotations

import pytest
import torch

import tessera.ops as O
from tessera.errors import TesseraError
from tessera.ops import docs
from tessera.ops.registry import KINDS, definitions

KNOWN_DTYPES = {"float32", "bfloat16", "float16", "int8", "uint8", "int32", "int64", "bool"}


def test_every_op_is_fully_described() -> None:
    names = O.list()
    assert names == sorted(names) and len(names) == len(set(names)) and len(names) > 40
    for d in definitions():
        assert d.kind in KINDS, d.name
        assert d.doc, f"{d.name} has no docstring"
        assert set(d.dtypes) <= KNOWN_DTYPES, d.name
        assert callable(d.reference) and callable(d.meta) and callable(d.impl)
        assert getattr(O, d.name) is d.eager and d.eager.op is d
        assert hasattr(torch.ops.tessera, d.name), d.name
        for target in d.implements:
            assert isinstance(target, torch._ops.OpOverload), (d.name, target)
    assert O.list("normalization") == ["batch_norm", "group_norm", "layer_norm", "rms_norm"]
    with pytest.raises(TesseraError, match="no operator named 'nope'"):
        O.get("nope")


def test_docs_current() -> None:
    assert docs.default_path().read_text() == docs.render(), \
        "docs/ops.md is stale: run `python -m tessera.ops.docs`"


def test_torch_ops_match_eager() -> None:
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    torch.testing.assert_close(torch.ops.tessera.layer_norm(x, [16], w, b),
                               O.layer_norm(x, [16], w, b))
    torch.testing.assert_close(torch.ops.tessera.add(x, w, alpha=2), x + 2 * w)
    values, indices = torch.ops.tessera.max(x, 1)
    assert torch.equal(indices, x.argmax(1)) and torch.equal(values, x.amax(1))


def _block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.ops.tessera.gelu(torch.ops.tessera.add(x, w))
    h = torch.ops.tessera.layer_norm(h, [h.shape[-1]], w, None, 1e-5)
    return torch.ops.tessera.softmax(h, -1)


def _eager_block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.gelu(x + w)
    return torch.softmax(torch.nn.functional.layer_norm(h, [h.shape[-1]], w, None, 1e-5), -1)


def test_inside_torch_compile() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, dynamic=True)
    for rows in (3, 5):  # dynamic shapes through the fake implementations
        x, w = torch.randn(rows, 32), torch.randn(32)
        torch.testing.assert_close(compiled(x, w), _eager_block(x, w))


def test_inside_torch_export() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _block(x, self.w)

    m = Block().eval()
    x = torch.randn(4, 32)
    ep = torch.export.export(m, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"tessera.gelu.default", "tessera.softmax.default"} <= targets, targets
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _eager_block(x, m.w))
