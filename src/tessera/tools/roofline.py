"""The roofline model of this device: work and traffic of an op from its shapes, its
position against the measured peaks, and the plot.

Work is counted for GEMM-like ops only (2 flops per multiply-add): matmul, mm, bmm,
linear, addmm, baddbmm, quantized_linear (2·|out|·K), conv2d (2·|out|·Cin/groups·kh·kw),
scaled dot-product attention (2·B·H·Sq·Sk·(D + Dv), masks ignored), grouped_matmul
(2·T·K·N) and fused_moe (2·T·top_k·3·H·I, float experts). Traffic is the bytes of the
inputs plus the outputs: the least an op must move, so GB/s is a lower bound.
The roofs are `tessera info`'s measured peaks: fp32 FMA GFLOPS on every core, and STREAM
copy bandwidth (bytes read plus written per second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

__all__ = ["Peaks", "RooflineError", "op_bytes", "op_flops", "peaks", "plot", "position"]

Shape = tuple[int, ...]
Operand = tuple[Shape, str]  # (shape, dtype name) as a profile's op events give

_ITEMSIZE = {"float64": 8, "int64": 8, "complex64": 8, "uint64": 8, "float32": 4, "int32": 4,
             "uint32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2, "int8": 1,
             "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_GEMM_K_OF = {"matmul": 0, "mm": 0, "bmm": 0, "linear": 0, "quantized_linear": 0,
              "addmm": 1, "baddbmm": 1}  # the operand whose last dim is the reduction K
_ATTENTION = {"scaled_dot_product_attention", "scaled_dot_product_attention_lse",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"}


class RooflineError(TesseraError):
    """A roofline that cannot be drawn (no plotting library, an unknown file type)."""


@dataclass(frozen=True)
class Peaks:
    """The device's roofs: GFLOPS (fp32) and GB/s."""

    gflops: float
    gbs: float

    @property
    def ridge(self) -> float:
        """Flops per byte where the memory roof meets the compute roof."""
        return self.gflops / self.gbs


def peaks() -> Peaks:
    """This machine's measured peaks (measured once, ~1.5 s, then cached)."""
    from tessera.runtime.cpu.probe import measured_peaks
    p = measured_peaks()
    return Peaks(float(p["peak_gflops_fp32"]), float(p["copy_bandwidth_gbs"]))


def _base(op: str) -> str:
    """The op's name without a graph prefix or an overload: "torch:aten.mm.default" ->
    "mm", "linear" -> "linear"."""
    name = op.rpartition(":")[2]
    parts = name.split(".")
    if parts[0] in ("aten", "tessera") and len(parts) > 1:
        return parts[1]
    return parts[0]


def op_flops(op: str, inputs: list[Operand], outputs: list[Operand],
             params: dict[str, Any] | None = None) -> int | None:
    """Floating-point operations of one call of `op` (None where not counted)."""
    name, params = _base(op), params or {}
    if not outputs:
        return None
    out = outputs[0][0]
    try:
        if name in _GEMM_K_OF:
            return 2 * math.prod(out) * inputs[_GEMM_K_OF[name]][0][-1]
        if name in ("conv2d", "convolution", "conv1d", "conv3d"):
            return 2 * math.prod(out) * math.prod(inputs[1][0][1:])
        if name in _ATTENTION:
            (q, _), (k, _), (v, _) = inputs[:3]
            return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
        if name == "grouped_matmul":
            (x, _), n = inputs[0], out[-1] * (2 if params.get("swiglu") else 1)
            return 2 * x[0] * x[-1] * n
        if name == "fused_moe" and "top_k" in params:
            (x, _), (wgu, wdt) = inputs[0], inputs[2]
            if not wdt.startswith(("float", "bfloat")):
                return None  # quantized experts: their shapes are packed data
            hidden = x[-1]
            inter = math.prod(wgu) // (wgu[0] * hidden) // 2
            return 2 * (math.prod(x) // hidden) * int(params["top_k"]) * 3 * hidden * inter
    except (IndexError, TypeError, ZeroDivisionError):
        return None  # a form of the op these shapes do not describe
    return None


def op_bytes(inputs: list[Operand], outputs: list[Operand]) -> int:
    """Bytes of the operands read and written."""
    return sum(math.prod(shape) * _ITEMSIZE.get(dtype, 4) for shape, dtype in
               [*inputs, *outputs])


def position(gflops: float | None, gbs: float | None, intensity: float | None, roof: Peaks
             ) -> tuple[float | None, str | None]:
    """(fraction of the roofline attained, "compute" or "memory" bound) at `gflops` and
    `intensity` (flops per byte); with no flops counted, `gbs` against the memory roof."""
    if gflops is not None and intensity:
        attainable = min(roof.gflops, intensity * roof.gbs)
        return gflops / attainable, "compute" if intensity >= roof.ridge else "memory"
    if gbs is not None:
        return gbs / roof.gbs, "memory"
    return None, None


def plot(points: list[tuple[str, float, float]], roof: Peaks, path: str | Path,
         title: str = "Roofline") -> Path:
    """Draw the roofline with `points` (label, flops per byte, GFLOPS) into `path` (.png,
    .svg or .pdf)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise RooflineError(f"cannot draw a roofline into {path.name!r}",
                            hint="name a .png, .svg or .pdf file")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RooflineError("the roofline plot needs matplotlib, which is not installed",
                            hint="pip install matplotlib (or tessera[tools])") from None
    xs = [p[1] for p in points] or [roof.ridge]
    lo = min(min(xs), roof.ridge) / 4
    hi = max(max(xs), roof.ridge) * 4
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(grid, [min(roof.gflops, x * roof.gbs) for x in grid], color="black",
                label=f"roof: {roof.gflops:.0f} GFLOPS, {roof.gbs:.1f} GB/s")
        ax.axvline(roof.ridge, color="gray", linestyle=":", linewidth=1)
        for label, intensity, gflops in points:
            ax.scatter([intensity], [gflops], s=30, zorder=3)
            ax.annotate(label, (intensity, gflops), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (flop / byte)")
        ax.set_ylabel("GFLOPS")
        ax.set_title(title)
        ax.legend(loc="lower right")
        ax.grid(True, which="both", alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
