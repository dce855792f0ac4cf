"""Launcher plumbing shared by the GEMV and GEMM matmul launchers: checks, allocation, epilogue.

Both kernels compute y [M, N] = x[:, perm] @ W^T (+ bias) with x flattened to [M, K]. With SPLIT_K == 1
a program stores its tile straight into ``y`` (activation dtype); with SPLIT_K > 1 each split writes its
fp32 partial into an uninitialised workspace [max_split, M, N] and the last split of each output tile
(found through a per-tile counter in a cached, self-resetting int32 buffer) reduces and stores ``y``
(``_jit._store_tile``). Either way one kernel launch and no device sync: the op stays capturable in
a CUDA graph (warm each shape up before capture, so the counter buffer is allocated outside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ._jit import _magic_f32
from .configs import COMPILE_OPTIONS, interpreting
from .layout import SUPPORTED_BITS, kernel_rows

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_group_size(group_size: int | None, in_features: int) -> int:
    """The group size the kernels see: per-channel (None, or >= K) becomes a multiple of 1024 >= K.

    Any power-of-two BLOCK_K <= 1024 then divides it, so per-channel weights take the one-group-per-tile
    path, and k // group_size is still 0 for every k < K.
    """
    if group_size is None or group_size >= in_features:
        return triton.cdiv(max(in_features, 1), 1024) * 1024
    return group_size


def check_layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, k: int) -> None:
    """Shape/dtype checks shared by the launchers (ValueError saying what is wrong)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"Triton kernels support bits in {SUPPORTED_BITS}, got {bits}; use the reference")
    n = qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] != kernel_rows(k, bits):
        raise ValueError(
            f"qweight must be int32 [{kernel_rows(k, bits)}, N] for K={k}, bits={bits}; "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if scales.dtype != torch.float16 or zeros.dtype != torch.uint8:
        raise ValueError(f"scales must be float16 and zeros uint8, got {scales.dtype}/{zeros.dtype}")
    if scales.shape != zeros.shape or scales.shape[1] != n:
        raise ValueError(f"scales/zeros must be [G, {n}], got {tuple(scales.shape)}/{tuple(zeros.shape)}")


def check_interpretable(t: torch.Tensor) -> None:
    """Triton on CPU tensors only works in the interpreter, which must be on before kernels import."""
    # by class name: triton.runtime.interpreter need not be imported when not interpreting
    if t.device.type == "cpu" and type(_magic_f32).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before llmquant.kernels is imported"
        )


@dataclass
class MatmulLaunch:
    """Flattened operands, outputs and the constexpr flags of one quantized-matmul launch."""

    x: torch.Tensor  # [M, K]
    y: torch.Tensor  # [M, N], x's dtype
    workspace: torch.Tensor  # fp32 [max_split, M, N] uninitialised (split-K), or y when it cannot happen
    locks: torch.Tensor  # int32 tile counters (zeros between launches), shared per device
    out_shape: tuple[int, ...]
    meta: dict

    @property
    def m(self) -> int:
        return self.x.shape[0]


def prepare(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    max_split: int,
) -> MatmulLaunch:
    """Check operands, flatten x to [M, K], allocate y (and a split-K workspace for up to
    ``max_split`` splits when that is > 1)."""
    k, n = x.shape[-1], qweight.shape[1]
    check_layout(qweight, scales, zeros, bits, k)
    check_interpretable(x)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"activations must be one of {ACT_DTYPES}, got {x.dtype}")
    devices = {t.device for t in (x, qweight, scales, zeros, perm, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all operands must be on one device, got {sorted(map(str, devices))}")
    if perm is not None and (perm.shape != (k,) or perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"perm must be int32/int64 [{k}], got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)  # x [..., K] -> [M, K]
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = max_split > 1
    workspace = torch.empty((max_split, m, n), dtype=torch.float32, device=x.device) if split else y
    locks = tile_locks(x.device, triton.cdiv(m, 16) * triton.cdiv(n, 16) if split else 1)
    meta = {
        "BITS": bits,
        "GROUP_SIZE": kernel_group_size(group_size, k),
        "FP16_MATH": x.dtype == torch.float16,
        # fp32 dots: exact "ieee" for fp32 x; also bf16 x under the interpreter, whose bf16 tl.dot is wrong
        # (Triton 3.9 numpy interpreter: O(1e10) errors) and whose fp32 -> bf16 casts truncate instead of
        # rounding to nearest; bf16 x values are exact in fp32 (GPU launches keep bf16 tensor-core dots)
        "FP32_DOT": x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
        "HAS_PERM": perm is not None,
        "HAS_BIAS": bias is not None,
        **COMPILE_OPTIONS,
    }
    return MatmulLaunch(x2, y, workspace, locks, (*x.shape[:-1], n), meta)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def tile_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 split-K tile counters on ``device``, at least ``tiles`` of them (BLOCK_M and
    BLOCK_N are >= 16 in every config). Cached; the kernels leave every counter at 0 again."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


def kernel_args(
    launch: MatmulLaunch,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple:
    """Positional kernel arguments (pointers, sizes, strides) in the kernels' signature order."""
    x, y = launch.x, launch.y
    # Absent optional operands get a dummy pointer; the HAS_PERM / HAS_BIAS flags keep them unread.
    return (
        x, qweight, scales, zeros, x if perm is None else perm, x if bias is None else bias, y,
        launch.workspace, launch.locks, x.shape[0], qweight.shape[1], x.shape[1],
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0),
        scales.stride(1), zeros.stride(0), zeros.stride(1), y.stride(0), y.stride(1),
    )  # fmt: skip


def finish(launch: MatmulLaunch) -> torch.Tensor:
    """y [..., N] as stored by the kernel (the last split of each tile stores it under split-K)."""
    return launch.y.reshape(launch.out_shape)
