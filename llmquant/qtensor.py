"""QuantizedWeight: the in-memory, format-neutral result of quantizing one linear weight.

Conventions (every format and kernel converts from/to exactly these):
- ``codes``  uint8   [N, K]  unsigned codes in [0, 2**bits - 1]
- ``scales`` float16 [N, G]  one scale per (output row, group); G = ceil(K / group_size)
- ``zeros``  uint8   [N, G]  true zero points (sym: 2**(bits-1)), never "minus one"
- ``g_idx``  int32   [K] | None  group of each input column; None means ``k // group_size``
- dequantization: ``W[n, k] = float32(scales[n, g]) * (float32(codes[n, k]) - float32(zeros[n, g]))``
  with ``g = g_idx[k]``, computed in float32 (exact: an fp16 scale times a small integer fits in
  float32) and then cast once to the target dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import QuantScheme


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int | None
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        g = QuantScheme(self.bits, self.group_size).num_groups(k)
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        if self.scales.shape != (n, g) or self.zeros.shape != (n, g):
            raise ValueError(
                f"scales/zeros must be [{n}, {g}], got {tuple(self.scales.shape)}/{tuple(self.zeros.shape)}"
            )
        if self.scales.dtype != torch.float16 or self.zeros.dtype != torch.uint8:
            raise ValueError("scales must be float16 and zeros uint8")
        if self.g_idx is not None and (self.g_idx.shape != (k,) or self.g_idx.dtype != torch.int32):
            raise ValueError(f"g_idx must be int32 [{k}]")

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the original weight."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    def group_index(self) -> torch.Tensor:
        """g_idx if set, else the trivial ``k // group_size`` (int64 [K])."""
        k = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        return trivial_g_idx(k, self.group_size, device=self.codes.device).long()

    def has_trivial_g_idx(self) -> bool:
        if self.g_idx is None:
            return True
        ref = trivial_g_idx(self.codes.shape[1], self.group_size, device=self.g_idx.device)
        return bool(torch.equal(self.g_idx, ref))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in ``dtype`` (computed in float32, rounded once)."""
        g = self.group_index()
        s = self.scales.float()[:, g]  # [N, G] -> [N, K]
        z = self.zeros.float()[:, g]  # [N, G] -> [N, K]
        return ((self.codes.float() - z) * s).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            bits=self.bits,
            group_size=self.group_size,
            g_idx=None if self.g_idx is None else self.g_idx.to(device),
        )

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows [start, stop) (rows are quantized independently, so this is exact)."""
        return QuantizedWeight(
            codes=self.codes[start:stop].clone(),
            scales=self.scales[start:stop].clone(),
            zeros=self.zeros[start:stop].clone(),
            bits=self.bits,
            group_size=self.group_size,
            g_idx=None if self.g_idx is None else self.g_idx.clone(),
        )

    def equal(self, other: QuantizedWeight) -> bool:
        """Bit-exact equality of the represented weight (g_idx None == trivial g_idx)."""
        if (self.bits, self.shape) != (other.bits, other.shape):
            return False
        same_fields = (
            torch.equal(self.codes, other.codes.to(self.codes.device))
            and torch.equal(self.scales, other.scales.to(self.scales.device))
            and torch.equal(self.zeros, other.zeros.to(self.zeros.device))
            and torch.equal(self.group_index(), other.group_index().to(self.codes.device))
        )
        return same_fields or bool(torch.equal(self.dequantize(), other.dequantize().to(self.codes.device)))


def trivial_g_idx(
    in_features: int, group_size: int | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int32 [K]: ``k // group_size`` (all zeros for per-channel)."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size is None else k // group_size
