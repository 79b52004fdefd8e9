"""Reading and writing stored float values inside numba kernels: float32, and bfloat16 as bits.

numba has no bfloat16, so bf16 arrays reach the kernels as uint16 views of their bits. A bf16
value is the upper half of a float32, so widening is exact (a shift and a bit cast), and
narrowing rounds to nearest even exactly as torch's `.to(torch.bfloat16)` does (NaN becomes
0x7FC0). `load`, `store` and `is_finite` compile to the right code for either element type.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

I32 = ir.IntType(32)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], I32)
        return builder.bitcast(builder.shl(wide, ir.Constant(I32, 16)), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def f32_bits(typingctx, value):
    """The bits of a float32 value, as a uint32 (a bit cast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], I32)
    return types.uint32(value), codegen


def load(value):
    """The float32 value of one stored element (a bf16's bits or a float32)."""


def store(out, j, value):
    """out[j] = value (float32), rounded to the array's storage type."""


@overload(load, inline="always")
def _load(value):
    if value == types.uint16:
        return lambda value: _bf16_to_f32(value)
    if value == types.float32:
        return lambda value: value
    return None


@overload(store, inline="always")
def _store(out, j, value):
    if out.dtype == types.uint16:
        def store_bf16(out, j, value):
            bits = f32_bits(value)
            if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                out[j] = np.uint16(0x7FC0)  # NaN, as torch rounds it
            else:
                rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                out[j] = np.uint16((bits + rounding) >> np.uint32(16))
        return store_bf16
    if out.dtype == types.float32:
        def store_f32(out, j, value):
            out[j] = value
        return store_f32
    return None


def is_finite(value):
    """1 if the float32 value is neither NaN nor infinite, else 0 (an int, so sums vectorise)."""


@overload(is_finite, inline="always")
def _is_finite(value):
    def finite(value):
        return np.int64(abs(value) < np.float32(np.inf))
    return finite


def is_negative_zero(value):
    """True if the stored value is -0.0 (bf16 bits 0x8000, or a float32 -0.0)."""


@overload(is_negative_zero, inline="always")
def _is_negative_zero(value):
    # a bit test, not a comparison and a copysign: it vectorises
    if value == types.uint16:
        return lambda value: value == np.uint16(0x8000)
    if value == types.float32:
        return lambda value: f32_bits(value) == np.uint32(0x80000000)
    return None
