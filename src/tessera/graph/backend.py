"""The torch.compile backend "tessera" (registered through the `torch_dynamo_backends`
entry point, so `torch.compile(model, backend="tessera")` works with no import).

Dynamo hands over a torch-level graph; AOTAutograd turns it into an aten graph
(functional: in-place ops rewritten, inference only) and tells which inputs are the
module's parameters and buffers. Those are frozen as constants; the rest of the inputs
are the compiled function's arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tessera.graph.compiler import compile_graph
from tessera.graph.frontend import from_fx

__all__ = ["HOOKS", "tessera"]

# Called as hook(compiled, args) before every call of a graph the backend compiled while
# the hook is in the list (tessera.tools.compare watches the first call's inputs):
# `compiled.fx` is the aten graph, `compiled.executable(*args)` the Executable the call
# runs, `compiled.options` the compiler options.
HOOKS: list[Callable[[Any, tuple[Any, ...]], None]] = []


def tessera(gm: torch.fx.GraphModule, example_inputs: list[Any],
            options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Dynamo backend: compile `gm` for inference with Tessera."""
    from torch._dynamo.backends.common import aot_autograd

    opts = dict(options or {})

    def forward(aten_gm: torch.fx.GraphModule, aten_inputs: list[Any]) -> Callable[..., Any]:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():  # AOTAutograd calls this under its fake mode
            return _compile(aten_gm, aten_inputs)

    def _compile(aten_gm: torch.fx.GraphModule, aten_inputs: list[Any]) -> Callable[..., Any]:
        from torch._guards import TracingContext
        ctx = TracingContext.try_get()
        frozen: dict[int, torch.Tensor] = {}
        # parameters and buffers: AOTAutograd's static inputs, which (no input mutations,
        # no tensor subclasses) keep their position among dynamo's real example inputs
        if ctx is not None and ctx.fw_metadata is not None and \
                len(aten_inputs) == len(example_inputs):
            for i in ctx.fw_metadata.static_input_indices:
                real, fake = example_inputs[i], aten_inputs[i]
                if isinstance(real, torch.Tensor) and real.shape == fake.shape and \
                        real.dtype == fake.dtype:
                    frozen[i] = real.detach()
        graph = from_fx(aten_gm, frozen)
        keep = [i for i in range(len(aten_inputs)) if i not in frozen]
        # Dynamo passes an inlined module's parameters as inputs without guarding on which
        # tensors they are: code it compiled once (an expert's forward after a graph break)
        # runs again for another instance. One executable per set of frozen tensors.
        runs = {tuple(id(example_inputs[i]) for i in frozen):
                (compile_graph(graph, opts), [example_inputs[i] for i in frozen])}

        def executable(*args: Any) -> Any:
            key = tuple(id(args[i]) for i in frozen)
            hit = runs.get(key)
            if hit is None:
                again = from_fx(aten_gm, {i: args[i].detach() for i in frozen})
                hit = runs[key] = (compile_graph(again, opts), [args[i] for i in frozen])
            return hit[0]

        def compiled(*args: Any) -> Any:
            if HOOKS:
                for hook in list(HOOKS):
                    hook(compiled, args)
            return executable(*args)(*(args[i] for i in keep))
        compiled.graph = graph  # type: ignore[attr-defined]
        compiled.fx, compiled.options = aten_gm, opts  # type: ignore[attr-defined]
        compiled.executable = executable  # type: ignore[attr-defined]
        compiled.inputs = keep  # type: ignore[attr-defined]  # args the executable takes
        return compiled

    return aot_autograd(fw_compiler=forward, decompositions=decompositions(),
                        keep_inference_input_mutations=True)(gm, example_inputs)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """aten ops rewritten into ones the registry has, before lowering."""
    from torch._decomp import get_decompositions
    aten = torch.ops.aten
    table = get_decompositions([
        aten.linear, aten.silu_, aten.gelu_, aten.relu_, aten.addcmul, aten.addcdiv,
        aten.native_dropout, aten.dropout, aten.hardtanh, aten.leaky_relu, aten.elu,
        aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus, aten.logsumexp,
        aten.std, aten.var_mean, aten.rsub, aten.squeeze, aten.new_zeros, aten.new_ones,
        aten.zeros_like, aten.ones_like, aten.full_like, aten.masked_fill, aten.lerp,
        aten.native_layer_norm_backward, aten.tril, aten.triu, aten.stack,
    ])
    table[aten.pow.Tensor_Scalar] = _pow_scalar
    table[aten._to_copy.default] = _cast
    return table


def _cast(x: torch.Tensor, **kwargs: Any) -> Any:
    """Casts registry ops compute exactly: x.to(torch.bool) is x != 0 (an attention mask's
    int -> bool), an integer x.to(default float) is x * 1.0 (rotary positions' .float(),
    promoted as torch promotes); other casts stay."""
    dtype = kwargs.pop("dtype", None)
    if dtype is None or dtype == x.dtype or any(
            v not in (None, False, x.device, x.layout, torch.preserve_format)
            for v in kwargs.values()):
        return NotImplemented
    if dtype == torch.bool:
        return torch.ops.aten.ne.Scalar(x, 0)
    if not x.is_floating_point() and not x.is_complex() and \
            dtype == torch.get_default_dtype():
        return torch.ops.aten.mul.Tensor(x, 1.0)
    return NotImplemented


def _pow_scalar(x: torch.Tensor, exponent: Any) -> Any:
    """x ** exponent for the exponents models write (RMSNorm's x.pow(2), GELU-tanh's
    x ** 3, 1/sqrt): products and roots, as exact as torch's; other powers stay."""
    aten = torch.ops.aten
    if not x.is_floating_point() or isinstance(exponent, bool):
        return NotImplemented
    if exponent == 2:
        return aten.mul.Tensor(x, x)
    if exponent == 3:
        return aten.mul.Tensor(aten.mul.Tensor(x, x), x)
    if exponent == 0.5:
        return aten.sqrt.default(x)
    if exponent == -0.5:
        return aten.rsqrt.default(x)
    return NotImplemented
