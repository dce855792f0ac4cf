"""Calibration activations that overflow are reported per layer, with the remedy."""

from __future__ import annotations

import pytest
import torch

from llmquant.errors import NumericsError
from llmquant.numerics import check_finite_activations


def test_finite_activations_pass() -> None:
    check_finite_activations([torch.randn(2, 4, 8), torch.randn(1, 4, 8)], 3, torch.float16)


def test_float16_overflow_names_the_layer_and_the_remedy() -> None:
    y = torch.randn(2, 4, 8, dtype=torch.float16)
    y[1, 2, 3] = float("inf")
    y[0, 0, 0] = float("nan")
    with pytest.raises(NumericsError) as exc:
        check_finite_activations([torch.zeros(1, 4, 8), y], 7, torch.float16)
    msg = str(exc.value)
    assert "leaving decoder layer 7 hold 2 NaN/inf values (batch 1, computed in float16)" in msg
    assert "bfloat16" in msg and "--device cpu" in msg and "\n" not in msg


def test_float32_nan_has_another_remedy() -> None:
    with pytest.raises(NumericsError, match="degenerate"):
        check_finite_activations([torch.full((1, 2, 2), float("nan"))], 0, torch.float32)


def test_pipeline_stops_at_the_overflowing_layer(tiny_llama, make_tiny_tokenizer, calib_text_file) -> None:
    """A layer whose outputs overflow float32 (a norm weight of 1e30) stops GPTQ at that layer."""
    from llmquant import CalibrationConfig, GPTQConfig, QuantScheme, quantize

    tokenizer = make_tiny_tokenizer([calib_text_file.read_text()], vocab_size=256)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight.fill_(3e38)
    calib = CalibrationConfig(source=str(calib_text_file), n_samples=2, seqlen=16)
    with pytest.raises(NumericsError, match="decoder layer 0"):
        quantize(tiny_llama, GPTQConfig(QuantScheme(4, 32, True)), calib, tokenizer=tokenizer, progress=False)
