"""NVFP4 storage, the one contract every layer accepts: :class:`NVFP4Blocks` (any tensor as quantized, with
the search's choices) and :class:`NVFP4Weight` (a linear layer's weight, its layout checked here and nowhere
else).

Layout (torchao's ``NVFP4Tensor``, unswizzled): E2M1 codes packed two a byte, ``qdata`` uint8 ``(..., K // 2)``
with element 2i in the low nibble; E4M3 block scales ``(..., K // 16)`` (their float8_e4m3fn bit patterns as
uint8, because CPU PyTorch cannot compare float8 tensors); an optional float32 global scale. A value is
``e2m1(code) * (global scale * e4m3(scale code))``. A weight is stored as ``(out_features, in_features // 2)``;
``w.t()`` of a weight tensor is a view whose storage is transposed, recognised by :func:`is_transposed`.
"""

from dataclasses import dataclass

import torch

from scalesearch_compile.formats import e2m1_decode_packed, e4m3_value_table

BLOCK_SIZE = 16


def is_transposed(qdata: torch.Tensor) -> bool:
    """Whether 2-D ``qdata`` is a transposed view ``(K // 2, N)`` of an ``(N, K // 2)`` storage (after ``.t()``)."""
    return qdata.stride(-2) < qdata.stride(-1)


def unscaled_values(qdata: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """float32 ``e2m1(code) * e4m3(scale code)`` ``(..., K)`` of ``(..., K // 2)`` codes and ``(..., K // 16)``
    scale codes, the global scale left out: exact (a product of 2 and 4 significant bits)."""
    return _dequantize(qdata, scale_codes, None)


def _dequantize(qdata: torch.Tensor, scale_codes: torch.Tensor, per_tensor_scale: torch.Tensor | None):
    """float32 ``e2m1(code) * (pts * e4m3(scale code))`` of ``(..., K // 2)`` codes and ``(..., K // 16)`` scale
    codes; ``pts`` 0-d, broadcastable per row ``(..., 1)``, or None (1)."""
    scales = e4m3_value_table(scale_codes.device)[scale_codes.long()]
    if per_tensor_scale is not None:
        scales = per_tensor_scale * scales
    values = e2m1_decode_packed(qdata).unflatten(-1, (-1, BLOCK_SIZE))
    return (values * scales.unsqueeze(-1)).flatten(-2)


@dataclass(frozen=True)
class NVFP4Blocks:
    """A tensor quantized to NVFP4 (module layout), with the search's choices.

    ``qdata``: uint8 ``(..., K // 2)``. ``scale_codes``: uint8 E4M3 codes ``(..., K // 16)``.
    ``per_tensor_scale``: float32 0-d tensor, a per-row ``(..., 1)`` tensor, or None for single-level scaling.
    ``offsets``: int16 ``(..., K // 16)``, chosen code minus amax code per block.
    """

    qdata: torch.Tensor
    scale_codes: torch.Tensor
    per_tensor_scale: torch.Tensor | None
    offsets: torch.Tensor

    @classmethod
    def empty(cls, shape: torch.Size, per_tensor_scale: torch.Tensor | None, device) -> "NVFP4Blocks":
        """Uninitialised, contiguous blocks for a tensor of ``shape`` (..., K), for a quantizer to fill."""
        lead, k = tuple(shape[:-1]), shape[-1]
        return cls(
            torch.empty((*lead, k // 2), dtype=torch.uint8, device=device),
            torch.empty((*lead, k // BLOCK_SIZE), dtype=torch.uint8, device=device),
            per_tensor_scale,
            torch.empty((*lead, k // BLOCK_SIZE), dtype=torch.int16, device=device),
        )

    def block_scales(self) -> torch.Tensor:
        """float32 scale of each block, global scale included: ``pts * e4m3_value(code)``."""
        scales = e4m3_value_table(self.scale_codes.device)[self.scale_codes.long()]
        return scales if self.per_tensor_scale is None else self.per_tensor_scale * scales

    def dequantize(self) -> torch.Tensor:
        """float32 values ``e2m1_value(code) * (pts * e4m3_value(scale_code))``, shape ``(..., K)``."""
        return _dequantize(self.qdata, self.scale_codes, self.per_tensor_scale)

    def unscaled(self) -> torch.Tensor:
        """float32 ``e2m1_value(code) * e4m3_value(scale_code)``, the global scale left out (exact)."""
        return unscaled_values(self.qdata, self.scale_codes)


@dataclass(frozen=True)
class NVFP4Weight:
    """A linear layer's NVFP4 weight ``(N, K)`` = ``(out_features, in_features)``, or the weights of E experts
    ``(E, N, K)``, validated on construction (shapes, dtypes, orientation and devices only: no value is read, so
    it also checks fake tensors).

    ``qdata``: uint8 ``(N, K // 2)`` or ``(E, N, K // 2)``, not a transposed view, K a positive multiple of 16.
    ``scale_codes``: ``(..., N, K // 16)`` E4M3 codes, given as uint8 or float8_e4m3fn and kept as uint8.
    ``per_tensor_scale``: None, or floating-point global scales (torchao's multiplier ``amax / (448 * 6)``): one
    for a layer, kept as a float32 0-d tensor; one per expert, kept as float32 ``(E,)``.
    """

    qdata: torch.Tensor
    scale_codes: torch.Tensor
    per_tensor_scale: torch.Tensor | None = None

    def __post_init__(self):
        qdata, scale, pts = self.qdata, self.scale_codes, self.per_tensor_scale
        if not isinstance(qdata, torch.Tensor) or qdata.dtype != torch.uint8 or qdata.dim() not in (2, 3):
            raise ValueError(
                "NVFP4 weight qdata must be a 2-D uint8 tensor (out_features, in_features // 2), or 3-D "
                f"(experts, out_features, in_features // 2); {_got(qdata)}"
            )
        if is_transposed(qdata):
            raise ValueError(
                "NVFP4 weight qdata is a transposed view; pass the (out_features, in_features // 2) weight, "
                "as F.linear takes it"
            )
        k = qdata.shape[-1] * 2
        if k == 0 or k % BLOCK_SIZE:
            raise ValueError(f"NVFP4 weight in_features must be a positive multiple of {BLOCK_SIZE}, got {k}")
        expected = (*qdata.shape[:-1], k // BLOCK_SIZE)
        if (
            not isinstance(scale, torch.Tensor)
            or scale.dtype not in (torch.uint8, torch.float8_e4m3fn)
            or tuple(scale.shape) != expected
        ):
            raise ValueError(
                f"NVFP4 weight scales must be E4M3 codes (uint8 or float8_e4m3fn) of shape {expected}, one per 16 "
                f"values, unswizzled; {_got(scale)}"
            )
        scales = 1 if qdata.dim() == 2 else qdata.shape[0]
        if pts is not None and (
            not isinstance(pts, torch.Tensor) or pts.numel() != scales or not pts.is_floating_point()
        ):
            what = "a one-element float tensor" if scales == 1 else f"a float tensor of {scales} (one per expert)"
            raise ValueError(f"NVFP4 weight per_tensor_scale must be None or {what}; {_got(pts)}")
        for name, t in (("scale_codes", scale), ("per_tensor_scale", pts)):
            if t is not None and t.device != qdata.device:
                raise ValueError(f"NVFP4 weight {name} is on {t.device}, qdata on {qdata.device}")
        object.__setattr__(self, "scale_codes", scale.view(torch.uint8))
        if pts is not None:
            object.__setattr__(self, "per_tensor_scale", pts.detach().float().reshape(qdata.shape[:-2]))

    @classmethod
    def from_blocks(cls, blocks: NVFP4Blocks) -> "NVFP4Weight":
        """The weight of 2-D blocks quantized with one (0-d) global scale or none."""
        return cls(blocks.qdata, blocks.scale_codes, blocks.per_tensor_scale)

    @property
    def out_features(self) -> int:
        return self.qdata.shape[-2]

    @property
    def in_features(self) -> int:
        return self.qdata.shape[-1] * 2

    @property
    def num_experts(self) -> int | None:
        """E for the weights of experts, None for one layer's."""
        return self.qdata.shape[0] if self.qdata.dim() == 3 else None

    def expert(self, index: int) -> "NVFP4Weight":
        """Expert ``index``'s 2-D weight (views, no copy)."""
        pts = None if self.per_tensor_scale is None else self.per_tensor_scale[index]
        return NVFP4Weight(self.qdata[index], self.scale_codes[index], pts)

    def unscaled(self) -> torch.Tensor:
        """float32 ``e2m1(code) * e4m3(scale code)`` ``(..., N, K)``, the global scale left out: exact in float32
        (a product of 2 and 4 significant bits), so a matmul can apply the global scale to its result."""
        return unscaled_values(self.qdata, self.scale_codes)

    def dequantize(self) -> torch.Tensor:
        """float32 ``e2m1(code) * (per_tensor_scale * e4m3(scale code))``, shape ``(..., N, K)``."""
        pts = self.per_tensor_scale
        return _dequantize(self.qdata, self.scale_codes, None if pts is None else pts.reshape(*pts.shape, 1, 1))

    def check_operands(self, in_features: int, device: torch.device, bias: torch.Tensor | None) -> None:
        """ValueError naming the problem unless ``x @ W^T + bias`` is defined for an input x with
        ``in_features`` features on ``device``: the weight there, bias None or a floating-point ``(N,)`` tensor
        there."""
        if in_features != self.in_features:
            raise ValueError(
                f"linear input has {in_features} features but the NVFP4 weight has in_features {self.in_features}"
            )
        if device != self.qdata.device:
            raise ValueError(f"linear input is on {device}, the NVFP4 weight on {self.qdata.device}")
        if bias is not None and (
            not isinstance(bias, torch.Tensor)
            or not bias.is_floating_point()
            or tuple(bias.shape) != (self.out_features,)
            or bias.device != device
        ):
            raise ValueError(
                f"bias must be None or a floating-point tensor of shape ({self.out_features},) on {device}; "
                f"{_got(bias)}"
            )


def _got(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"got {t.dim()}-D {t.dtype} of shape {tuple(t.shape)} on {t.device}"
    return f"got {type(t).__name__}"


def expert_of_rows(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert each row of a grouped input belongs to: rows sorted by expert, ``offsets`` ``(E,)`` the
    cumulative row counts (as ``torch.nn.functional.grouped_mm`` takes them); int ``(rows,)`` in offsets'
    dtype, E for the rows past ``offsets[-1]``. Reads nothing on the host."""
    positions = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, positions, right=True)
