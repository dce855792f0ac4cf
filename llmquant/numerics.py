"""Numerical guards of the pipeline: calibration activations must stay finite from layer to layer."""

from __future__ import annotations

import torch

from .errors import NumericsError


def check_finite_activations(outputs: list[torch.Tensor], index: int, dtype: torch.dtype) -> None:
    """NumericsError naming decoder layer ``index`` when its (quantized) outputs hold NaN or inf, with the
    remedy: float16 overflows on models trained in bfloat16, so compute in bfloat16 or float32."""
    for batch, y in enumerate(outputs):
        if not bool(torch.isfinite(y).all()):
            bad = int((~torch.isfinite(y)).sum())
            remedy = (
                "the activations overflow float16 (common for models trained in bfloat16): convert the "
                "checkpoint to bfloat16 (config.json torch_dtype) or quantize with --device cpu (float32)"
                if dtype == torch.float16
                else "the layer's weights or inputs are degenerate; check the float model's own outputs"
            )
            raise NumericsError(
                f"calibration activations leaving decoder layer {index} hold {bad} NaN/inf values "
                f"(batch {batch}, computed in {str(dtype).removeprefix('torch.')}); {remedy}"
            )
