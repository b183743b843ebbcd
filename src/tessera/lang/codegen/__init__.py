"""Code generators: one C-style printer, with a dialect per target, and the C headers
that generated C and the C templates share: the math library (`tessera_math.h`) and the
tile-level GEMM micro-kernel (`tessera_tile.h`)."""

from pathlib import Path

MATH_HEADER = Path(__file__).with_name("tessera_math.h")
TILE_HEADER = Path(__file__).with_name("tessera_tile.h")

__all__ = ["MATH_HEADER", "TILE_HEADER"]
