"""Exact tables for E2M1, E4M3 and E8M0 rounding, and nibble packing, against torch and torchao."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4

from scalesearch_compile.formats import (
    E2M1_VALUES,
    e2m1_code_value,
    e2m1_decode,
    e2m1_decode_packed,
    e2m1_encode,
    e2m1_round,
    e2m1_value_table,
    e4m3_code_value,
    e4m3_decode,
    e4m3_encode,
    e4m3_value_table,
    e8m0_decode,
    e8m0_encode,
    pack_nibbles,
    unpack_nibbles,
)

# (input, expected E2M1 code): exact grid points, every tie (to the even code), saturation, signs.
E2M1_TABLE = [
    (0.0, 0),
    (0.24, 0),
    (0.25, 0),  # tie 0 | 0.5 -> code 0
    (0.26, 1),
    (0.5, 1),
    (0.75, 2),  # tie 0.5 | 1 -> code 2
    (1.0, 2),
    (1.25, 2),  # tie 1 | 1.5 -> code 2
    (1.5, 3),
    (1.75, 4),  # tie 1.5 | 2 -> code 4
    (2.0, 4),
    (2.5, 4),  # tie 2 | 3 -> code 4
    (2.51, 5),
    (3.0, 5),
    (3.5, 6),  # tie 3 | 4 -> code 6
    (4.0, 6),
    (5.0, 6),  # tie 4 | 6 -> code 6
    (5.01, 7),
    (6.0, 7),
    (7.0, 7),  # saturates
    (1e30, 7),
    (-0.0, 8),  # negative zero keeps its sign
    (-0.1, 8),  # rounds to -0
    (-0.75, 10),
    (-2.5, 12),
    (-6.0, 15),
    (-100.0, 15),
]


@pytest.mark.parametrize("value,code", E2M1_TABLE)
def test_e2m1_encode_table(value, code):
    assert e2m1_encode(torch.tensor([value])).item() == code


def test_e2m1_decode_table():
    codes = torch.arange(16, dtype=torch.uint8)
    expected = list(E2M1_VALUES) + [-v for v in E2M1_VALUES]
    got = e2m1_decode(codes)
    assert got.tolist() == expected
    assert torch.signbit(got[8])  # code 8 is -0.0


def test_e2m1_encode_matches_torchao_on_every_float_in_range():
    # Every 101st float32 bit pattern from 0 to 8.0 and its negative, clamped to [-6, 6] as torchao does.
    bits = torch.arange(0, 0x41000000, 101, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.cat([x, -x]).clamp(-6.0, 6.0)
    assert torch.equal(e2m1_encode(x), f32_to_f4_unpacked(x))


def test_e2m1_round_equals_decode_of_encode():
    bits = torch.arange(0, 0x41000000, 103, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    assert torch.equal(e2m1_round(x), e2m1_decode(e2m1_encode(x)))


def test_e4m3_value_table_is_float8_e4m3fn():
    table = e4m3_value_table()
    assert table.shape == (128,)
    reference = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(table[:127], reference[:127])
    assert torch.isnan(table[127]) and torch.isnan(reference[127])  # code 127 is E4M3's NaN
    assert table[1].item() == 2.0**-9 and table[8].item() == 2.0**-6 and table[126].item() == 448.0
    assert (table[1:127] > table[:126]).all()  # stepping by whole codes steps the value


def test_e2m1_decode_packed_is_unpack_then_decode():
    packed = torch.arange(256, dtype=torch.uint8).view(4, 64)  # every byte: every pair of codes
    assert torch.equal(e2m1_decode_packed(packed), e2m1_decode(unpack_nibbles(packed)))
    with pytest.raises(ValueError, match="must be uint8"):
        e2m1_decode_packed(packed.int())


# (input, expected E4M3 code): ties to even in the normal and subnormal ranges, saturation.
E4M3_TABLE = [
    (0.0, 0),
    (2.0**-10, 0),  # tie 0 | 2^-9 -> code 0
    (3 * 2.0**-10, 2),  # tie 2^-9 | 2*2^-9 -> code 2
    (7.5 * 2.0**-9, 8),  # tie 7*2^-9 | 2^-6 -> code 8
    (2.0**-6, 8),
    (1.0, 56),
    (1.0625, 56),  # tie 1 | 1.125 -> code 56 (mantissa 0)
    (1.1875, 58),  # tie 1.125 | 1.25 -> code 58 (mantissa 2)
    (1.9375, 64),  # tie 1.875 | 2 -> rounds into the next exponent
    (416.0, 125),
    (432.0, 126),  # tie 416 | 448 -> code 126 (mantissa 6)
    (448.0, 126),
    (464.0, 126),  # would round to 512: saturates
    (1e30, 126),
]


@pytest.mark.parametrize("value,code", E4M3_TABLE)
def test_e4m3_encode_table(value, code):
    assert e4m3_encode(torch.tensor([value])).item() == code


def test_e4m3_encode_matches_torch_cast_on_every_float_in_range():
    # Every 127th float32 bit pattern from 0 to 512: normal, subnormal and saturating inputs.
    bits = torch.arange(0, 0x44000000, 127, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    reference = x.clamp(0, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(e4m3_encode(x), reference)


def test_e4m3_decode_roundtrip():
    codes = torch.arange(127, dtype=torch.uint8)
    assert torch.equal(e4m3_encode(e4m3_decode(codes)), codes)


@pytest.mark.parametrize(
    "value,floor_code,ceil_code",
    [
        (1.0, 127, 127),
        (1.5, 127, 128),
        (3.0, 128, 129),
        (0.25, 125, 125),
        (2.0**-127, 0, 0),  # a float32 subnormal: code 0
        (1.5 * 2.0**-127, 0, 1),  # float32 subnormals are handled exactly
        (2.0**-130, 0, 0),  # below the E8M0 range: clamps to code 0
        (2.0**127, 254, 254),
        (3.0e38, 254, 254),  # above 2^127: clamps to the largest code
    ],
)
def test_e8m0_encode_table(value, floor_code, ceil_code):
    x = torch.tensor([value], dtype=torch.float32)
    assert e8m0_encode(x, "floor").item() == floor_code
    assert e8m0_encode(x, "ceil").item() == ceil_code


def test_e8m0_decode_matches_float8_e8m0fnu():
    codes = torch.arange(255, dtype=torch.uint8)
    reference = codes.view(torch.float8_e8m0fnu).float()
    assert torch.equal(e8m0_decode(codes), reference)
    assert e8m0_decode(torch.tensor([127])).item() == 1.0


def test_e8m0_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="unknown E8M0 rounding"):
        e8m0_encode(torch.ones(1), "nearest")


def test_encoders_reject_integer_input():
    for encode in (e2m1_encode, e4m3_encode, e8m0_encode):
        with pytest.raises(ValueError, match="floating-point"):
            encode(torch.ones(2, dtype=torch.int32))


def test_pack_puts_even_element_in_low_nibble():
    packed = pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]


def test_pack_rejects_odd_length_and_unpack_non_uint8():
    with pytest.raises(ValueError, match="even last dimension"):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_nibbles(torch.zeros(2, dtype=torch.int32))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
def test_pack_unpack_roundtrip_and_matches_torchao(codes):
    codes = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert torch.equal(packed, pack_uint4(codes))
    assert torch.equal(unpack_nibbles(packed), codes)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32))
def test_e2m1_encode_is_nearest_grid_value(value):
    x = torch.tensor([value], dtype=torch.float32)
    got = e2m1_decode(e2m1_encode(x)).item()
    clamped = max(-6.0, min(6.0, value))
    best = min(abs(clamped - math.copysign(v, value)) for v in E2M1_VALUES)
    assert abs(clamped - got) == best
    assert math.copysign(1.0, got) == math.copysign(1.0, value)


def test_element_wise_values_equal_the_tables():
    codes = torch.arange(128, dtype=torch.int32)
    e4m3 = codes[:127].to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(e4m3_code_value(codes)[:127].view(torch.int32), e4m3.view(torch.int32))
    assert torch.isnan(e4m3_code_value(codes)[127])
    e2m1 = e2m1_code_value(torch.arange(16))
    assert torch.equal(e2m1.view(torch.int32), e2m1_value_table().view(torch.int32))  # -0.0 for code 8


def test_packed_decode_traced_for_inductor_gives_the_eager_bits():
    packed = torch.arange(256, dtype=torch.uint8).view(8, 32)
    eager = e2m1_decode_packed(packed)  # the table gather
    compiled = torch.compile(e2m1_decode_packed, fullgraph=True)(packed)  # element-wise, traced on fake tensors
    assert torch.equal(eager.view(torch.int32), compiled.view(torch.int32))
    assert torch.equal(eager.view(torch.int32), e2m1_value_table()[unpack_nibbles(packed).long()].view(torch.int32))
