"""Number formats of NVFP4 and MXFP4: E2M1 elements, E4M3 and E8M0 block scales, nibble packing.

Every rounding here is exact and written with comparisons and integer bit arithmetic on float32, so that a
Triton kernel can reproduce it bit for bit (float casts cannot be used: Triton's interpreter truncates them).

E2M1 codes (4 bits): bit 3 is the sign, bits 0-2 index ``E2M1_VALUES``; negative inputs that round to zero
keep the sign bit (code 8), as torchao does.
E4M3 codes (float8_e4m3fn bit patterns, positive only): 0 is zero, 1..7 subnormals (k * 2**-9), 8..126
normals up to 448; 127 is NaN, produced only as the scale of a block holding a NaN or Inf value at run time
(so that the block dequantizes to NaN). Codes grow with the value, so a scale is stepped by adding whole codes.
E8M0 codes (float8_e8m0fnu): value 2**(code - 127), codes 0..254; 255 (NaN) is never produced.
Packing: two E2M1 codes a byte, the element with the even index in the low nibble (torchao, tl.dot_scaled).
"""

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MAX_CODE = 126
E4M3_NAN_CODE = 127
E8M0_MAX_CODE = 254

# Magnitudes of E2M1 codes 0..7.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def e2m1_round(a: torch.Tensor, *, out=None, scratch=None) -> torch.Tensor:
    """Round non-negative float32 ``a`` to the nearest E2M1 magnitude (float32), ties to even, saturating at 6.

    The grid spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]; adding and subtracting ``2**22 * spacing``
    makes float32's own round-to-nearest-even land on that grid, and the even multiple of the spacing is the
    even E2M1 code (a tie at 0.25 goes to 0, 0.75 to 1, 2.5 to 2, 5 to 4). The spacing is read from the
    exponent bits of ``a`` (0.5 * clamp(2**floor(log2 a), 1, 4)), so there are no comparisons at all.
    ``out`` (may be ``a`` itself) and ``scratch`` are optional float32 buffers shaped like ``a``.
    """
    y = torch.clamp(a, max=E2M1_MAX, out=out)
    bits = None if scratch is None else scratch.view(torch.int32)
    magic = torch.bitwise_and(y.view(torch.int32), 0x7F800000, out=bits).view(torch.float32)
    magic = magic.clamp_(1.0, 4.0).mul_(2.0**22)
    return y.add_(magic).sub_(magic)


def e2m1_magnitude_code(v: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude code (uint8 0..7) of an exact grid value ``v`` in E2M1_VALUES."""
    code = 2.0 * v.clamp(max=2.0) + (v - 2.0).clamp(0.0, 2.0) + ((v - 4.0) * 0.5).clamp(0.0, 1.0)
    return code.to(torch.uint8)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` (already divided by its scale) to E2M1 codes (uint8 0..15), ties to even, saturating.

    Negative values that round to zero keep the sign bit (code 8), as torchao's ``f32_to_f4_unpacked``.
    """
    _check_float(x, "e2m1_encode input")
    x = x.float()
    return e2m1_magnitude_code(e2m1_round(x.abs())) | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_value_table(device=None) -> torch.Tensor:
    """float32 values of the 16 E2M1 codes (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (uint8 0..15)."""
    return e2m1_value_table(codes.device)[codes.long()]


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 ``x`` to an E4M3 code (uint8 0..126): nearest, ties to even, saturating at 448.

    Matches ``x.clamp(0, 448).to(torch.float8_e4m3fn).view(torch.uint8)`` for finite ``x >= 0``.
    """
    _check_float(x, "e4m3_encode input")
    x = x.float().clamp(0.0, E4M3_MAX)
    # Normal range: drop 20 of float32's 23 mantissa bits with round-to-nearest-even on the bit pattern,
    # then rebias the exponent from 127 to 7 (the carry of a rounding overflow moves into the exponent).
    bits = x.view(torch.int32)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = (rounded - ((127 - 7) << 3)).clamp(max=E4M3_MAX_CODE)
    # Subnormal range: the value is k * 2**-9 with k = round-half-even(x * 2**9) in 0..8 (8 is the smallest
    # normal, code 8). The multiplication by a power of two is exact.
    subnormal = torch.round(x * 512.0).to(torch.int32)
    code = torch.where(x < E4M3_MIN_NORMAL, subnormal, normal)
    return code.to(torch.uint8)


def e4m3_code_value(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 codes (integer tensor, 0..127; 127 is NaN), from the bits: a normal code
    ``e << 3 | m`` is the float32 with exponent ``e + 120`` and mantissa ``m << 20``, a subnormal one ``m * 2**-9``.
    Exact, and element-wise (no table lookup), so that Inductor vectorises it."""
    codes = codes.to(torch.int32)
    mantissa = codes & 7
    normal = (((codes >> 3) + (127 - 7)) << 23 | (mantissa << 20)).view(torch.float32)
    values = torch.where(codes >= 8, normal, mantissa.float() * 2.0**-9)
    return torch.where(codes == E4M3_NAN_CODE, torch.nan, values)


def e4m3_value_table(device=None) -> torch.Tensor:
    """float32 values of E4M3 codes 0..127 (increasing up to 448 at code 126; code 127 is NaN)."""
    return e4m3_code_value(torch.arange(E4M3_NAN_CODE + 1, dtype=torch.int32, device=device))


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E4M3 codes (uint8 or integer tensor, 0..127)."""
    return e4m3_value_table(codes.device)[codes.long()]


def e8m0_encode(x: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """Power-of-two E8M0 code (uint8 0..254) of positive float32 ``x``.

    ``rounding="floor"``: the largest 2**e <= x (OCP MX: the shared exponent of amax, used as
    ``floor(log2(amax)) - 2`` for E2M1 elements). ``"ceil"``: the smallest 2**e >= x (never clips).
    Values below 2**-127 map to code 0, above 2**127 to code 254.
    """
    _check_float(x, "e8m0_encode input")
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"unknown E8M0 rounding {rounding!r}; expected 'floor' or 'ceil'")
    x = x.float()
    # float32 subnormals (below 2**-126) have no exponent field to read: scale them up by an exact 2**64.
    tiny = x < 2.0**-126
    x = torch.where(tiny, x * 2.0**64, x)
    bits = x.view(torch.int32)
    biased_exponent = (bits >> 23) - 64 * tiny.to(torch.int32)  # x > 0: the sign bit is clear
    if rounding == "ceil":
        biased_exponent = biased_exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return biased_exponent.clamp(0, E8M0_MAX_CODE).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values 2**(code - 127) of E8M0 codes (0..254); code 0 (2**-127) is a float32 subnormal."""
    return torch.exp2(codes.float() - 127.0)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes (0..15) along the last dimension, two a byte: element 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e2m1_code_value(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (integer tensor, 0..15; code 8 is -0.0), element-wise: magnitude code m is
    m / 2 up to 4 (2.0), then 3, 4, 6."""
    m = (codes & 7).float()
    magnitude = torch.where(m < 5.0, m * 0.5, torch.where(m < 7.0, m - 2.0, E2M1_MAX))
    return torch.where(codes >= 8, -magnitude, magnitude)


def _byte_value_bits() -> list:
    """For each byte 0..255, the float32 values of its two E2M1 codes (low nibble first) as the 8 bytes of one
    int64, so that one gather decodes both nibbles."""
    codes = torch.stack([torch.arange(256) & 0xF, torch.arange(256) >> 4], dim=-1)
    return e2m1_code_value(codes).view(torch.int64).flatten().tolist()


# Python ints, not a cached tensor: the table is rebuilt per call (256 values).
_BYTE_VALUE_BITS = _byte_value_bits()


def e2m1_decode_packed(packed: torch.Tensor) -> torch.Tensor:
    """float32 values of packed E2M1 codes: uint8 ``(..., n)`` -> ``(..., 2n)``, element 2i from the low nibble.

    Eager: one 8-byte gather per byte from a table of :func:`e2m1_code_value` (2-4x faster on a 2-core CPU than
    unpacking the nibbles and gathering each, 1536 x 384 weight: 13-25 ms against 47-82 ms under varying load;
    about 13x faster than the element-wise arithmetic). Under torch.compile (traced by Dynamo, or by AOTAutograd
    for ``ops.lowering``): :func:`e2m1_code_value` of the two nibbles, interleaved, which Inductor vectorises: 2.2x
    faster compiled than the gather (1408 x 256 bytes: 0.54 against 1.19 ms on one core). The same bits
    (tests/test_formats.py).
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed E2M1 codes must be uint8, got dtype {packed.dtype}")
    if torch.compiler.is_compiling():
        packed = packed.to(torch.int32)
        return torch.stack([e2m1_code_value(packed & 0xF), e2m1_code_value(packed >> 4)], dim=-1).flatten(-2)
    table = torch.tensor(_BYTE_VALUE_BITS, dtype=torch.int64, device=packed.device)
    return table[packed.long()].view(torch.float32)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``(..., n)`` -> codes ``(..., 2n)``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles needs uint8 input, got dtype {packed.dtype}")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
