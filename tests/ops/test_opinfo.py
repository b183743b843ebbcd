"""Every op that has a PyTorch OpInfo, driven by OpInfo's own sample inputs
(`torch.testing._internal.common_methods_invocations.op_db`, float32): our result against
the OpInfo's op on each sample. Samples that use what an op's schema does not take (an
output dtype, training-mode batch norm, ...) are counted, not run (clamp's OpInfo samples
all pass tensor bounds, which `clamp` does not take, so it is tested in test_pointwise);
the covered ops and counts are printed at the end of the session."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from opcheck import close

import tessera.ops as O
from tessera.errors import TesseraError

OUTSIDE = None  # an adapter's answer for a sample outside the op's schema
Adapter = Callable[[Any], "tuple[tuple, dict] | None"]


def _plain(allowed: tuple[str, ...] = ()) -> Adapter:
    """The sample as it is: (input, *args) and the kwargs, if they are all in `allowed`."""
    def adapt(s: Any) -> tuple[tuple, dict] | None:
        if set(s.kwargs) - set(allowed):
            return OUTSIDE
        return (s.input, *s.args), dict(s.kwargs)
    return adapt


def _where(s: Any) -> tuple[tuple, dict] | None:
    return (s.args[0], s.input, s.args[1]), {}


def _var(s: Any) -> tuple[tuple, dict] | None:
    kw = dict(s.kwargs)
    if "unbiased" in kw:
        kw["correction"] = int(kw.pop("unbiased"))
    args = list(s.args)
    if len(args) == 1 and isinstance(args[0], bool):  # var(x, unbiased)
        kw["correction"] = int(args.pop())
    if args:  # var(x, dim, unbiased, keepdim) positionally
        return OUTSIDE
    if set(kw) - {"correction", "keepdim", "dim"} or not isinstance(kw.get("correction", 1),
                                                                   int):
        return OUTSIDE
    return (s.input, *args), kw


def _batch_norm(s: Any) -> tuple[tuple, dict] | None:
    kw = dict(s.kwargs)
    if kw.pop("training", False) or s.args[0] is None or s.args[1] is None:
        return OUTSIDE
    kw.pop("momentum", None)
    return (s.input, *s.args[:4]), kw


def _embedding(s: Any) -> tuple[tuple, dict] | None:
    kw = dict(s.kwargs)
    kw.pop("padding_idx", None)  # affects gradients only
    if kw:
        return OUTSIDE
    return (s.input, s.args[0]), {}  # OpInfo's op is (weight, indices), as ours


def _gather(s: Any) -> tuple[tuple, dict] | None:
    if s.args[1].dtype not in (torch.int32, torch.int64):  # an empty uint8 index: torch only
        return OUTSIDE
    return _plain()(s)


def _max_pool(s: Any) -> tuple[tuple, dict] | None:
    kw = dict(s.kwargs)
    if kw.pop("return_indices", False):
        return OUTSIDE
    return (s.input, *s.args), kw


def _split(s: Any) -> tuple[tuple, dict] | None:
    sizes, *rest = s.args
    if isinstance(sizes, int):  # chunks of `sizes` rows, the last one shorter
        dim = (rest or [s.kwargs.get("dim", 0)])[0]
        n = s.input.shape[dim]
        sizes = [min(sizes, n - i) for i in range(0, n, sizes)] or [0]
    return (s.input, list(sizes), *rest), {k: v for k, v in s.kwargs.items() if k == "dim"}


# (OpInfo name, variant) -> (our op, adapter)
COVERED: dict[tuple[str, str], tuple[str, Adapter]] = {
    **{(n, ""): (n, _plain(("alpha",))) for n in ("add", "sub")},
    **{(n, ""): (n, _plain()) for n in (
        "mul", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
        "logical_or", "logical_xor", "logical_not", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
        "tanh", "sigmoid", "erf", "sin", "cos", "contiguous")},
    **{(n, ""): (n, _plain(("dim", "keepdim"))) for n in ("argmax", "argmin")},
    ("div", "no_rounding_mode"): ("div", _plain()),
    ("nn.functional.relu", ""): ("relu", _plain()),
    ("nn.functional.gelu", ""): ("gelu", _plain(("approximate",))),
    ("nn.functional.silu", ""): ("silu", _plain()),
    ("where", ""): ("where", _where),
    **{(n, ""): (n, _plain(("dim", "keepdim"))) for n in ("sum", "mean", "amax", "amin")},
    ("max", "reduction_with_dim"): ("max", _plain(("keepdim",))),
    ("min", "reduction_with_dim"): ("min", _plain(("keepdim",))),
    ("max", "reduction_no_dim"): ("amax", _plain()),
    ("min", "reduction_no_dim"): ("amin", _plain()),
    ("max", "binary"): ("maximum", _plain()),
    ("min", "binary"): ("minimum", _plain()),
    ("var", ""): ("var", _var),
    ("var", "unbiased"): ("var", _var),
    ("softmax", ""): ("softmax", _plain()),
    ("log_softmax", ""): ("log_softmax", _plain()),
    ("nn.functional.layer_norm", ""): ("layer_norm", _plain(("eps", "weight", "bias"))),
    ("nn.functional.rms_norm", ""): ("rms_norm", _plain(("eps", "weight"))),
    ("nn.functional.group_norm", ""): ("group_norm", _plain(("eps", "weight", "bias"))),
    ("nn.functional.batch_norm", ""): ("batch_norm", _batch_norm),
    ("gather", ""): ("gather", _gather),
    **{(n, ""): (n, _plain()) for n in ("matmul", "bmm", "index_select",
                                        "scatter_add", "transpose", "permute")},
    **{(n, ""): (n, _plain(("beta", "alpha"))) for n in ("baddbmm", "addmm")},
    ("nn.functional.linear", ""): ("linear", _plain(("bias",))),
    ("nn.functional.conv2d", ""): ("conv2d", _plain(("stride", "padding", "dilation",
                                                     "groups", "bias"))),
    ("nn.functional.max_pool2d", ""): ("max_pool2d", _max_pool),
    ("nn.functional.avg_pool2d", ""): ("avg_pool2d", _plain((
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override"))),
    ("nn.functional.adaptive_avg_pool2d", ""): ("adaptive_avg_pool2d", _plain()),
    ("nn.functional.embedding", ""): ("embedding", _embedding),
    ("index_add", ""): ("index_add", _plain(("alpha",))),
    ("cat", ""): ("cat", _plain(("dim",))),
    ("split", ""): ("split", _split),
    ("split", "list_args"): ("split", _split),
    ("split_with_sizes", ""): ("split", _plain(("dim",))),
    ("topk", ""): ("topk", _plain(("dim", "largest", "sorted"))),
}

MAX_SAMPLES = 30  # per OpInfo (max_pool2d has 1440; conv2d and pool samples compile kernels)


def _opinfos() -> list[Any]:
    from torch.testing._internal.common_methods_invocations import op_db
    return [o for o in op_db if (o.name, o.variant_test_name) in COVERED]


@pytest.mark.parametrize("info", _opinfos(), ids=lambda o: ".".join(
    filter(None, (o.name, o.variant_test_name))))
def test_opinfo_samples(info: Any, record_property: Callable[[str, object], None]) -> None:
    name, adapt = COVERED[(info.name, info.variant_test_name)]
    counts = {"op": name, "compared": 0, "outside": 0}
    record_property("opinfo", (f"{info.name} {info.variant_test_name}".strip(), counts))
    calls = []
    for i, sample in enumerate(info.sample_inputs("cpu", torch.float32)):
        call = adapt(sample)
        if call is OUTSIDE:
            counts["outside"] += 1
        else:
            calls.append((i, sample, call))
    stride = -(-len(calls) // MAX_SAMPLES)  # every stride-th: the sweep's spread, less time
    for i, sample, call in calls[::stride]:
        args, kwargs = call
        want = info.op(sample.input, *sample.args, **sample.kwargs)
        if isinstance(want, tuple):  # torch's namedtuples (max/min with dim)
            want = tuple(want)
        try:
            got = getattr(O, name)(*args, **kwargs)
        except TesseraError as e:
            raise AssertionError(f"{name} refused OpInfo sample {i} ({sample}): {e}") from e
        close(got, want, atol=1e-4, rtol=1e-4, what=f"{name} sample {i}")
        counts["compared"] += 1
    assert counts["compared"] > 0, f"no OpInfo sample of {info.name} reached {name}"
