"""The AWQ transform on real (tiny) decoder layers, and AWQ through the pipeline, formats, resume and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_pipeline import _blocks, interrupt_run

from llmquant import pipeline
from llmquant.api import save_quantized
from llmquant.config import AWQConfig, GPTQConfig, QuantScheme, RTNConfig
from llmquant.loading import from_pretrained
from llmquant.source import LoadedModel
from llmquant.transforms import AWQTransform, _masked_mse

SCHEME = QuantScheme(bits=4, group_size=32, sym=False)


def _context(model, blocks, batch_size: int = 4):
    """The pipeline's LayerContext for decoder layer 0 (float32, CPU)."""
    source = LoadedModel(model)
    inputs, kwargs, masks = pipeline.capture_layer_inputs(
        source, blocks, batch_size, torch.device("cpu"), torch.float32
    )
    return pipeline._Context(0, source.arch, inputs, kwargs, masks, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_gqa_skips_v_to_o_with_its_reason(make_tiny_llama, kv_heads: int) -> None:
    model = make_tiny_llama(layers=1, kv_heads=kv_heads)
    ctx = _context(model, _blocks(n=4, seqlen=32))
    layer = model.model.layers[0]
    o_before = layer.self_attn.o_proj.weight.clone()
    notes = AWQTransform(AWQConfig(SCHEME, clip=False)).apply(layer, ctx)
    skipped = notes["self_attn.o_proj"].get("awq_skipped")
    if kv_heads == 2:  # 4 query heads share 2 KV heads: v_proj has half o_proj's input width
        assert skipped and "grouped-query" in skipped and "self_attn.v_proj outputs 32" in skipped
        assert torch.equal(layer.self_attn.o_proj.weight, o_before)
    else:
        assert skipped is None and "awq_alpha" in notes["self_attn.o_proj"]


@pytest.mark.parametrize("pad_tail", [0, 8])
def test_every_mapping_beats_alpha_zero_and_identity(make_tiny_llama, pad_tail: int) -> None:
    model = make_tiny_llama(layers=1, kv_heads=4)
    ctx = _context(model, _blocks(n=8, seqlen=32, pad_tail=pad_tail))
    notes = AWQTransform(AWQConfig(QuantScheme(3, 16, False), search_samples=8)).apply(
        model.model.layers[0], ctx
    )
    mapped = [n for n in notes.values() if "awq_loss" in n]
    assert len(mapped) == 7  # q, k, v, o, gate, up, down: every mapping applies without GQA
    for note in mapped:
        assert note["awq_loss"] <= note["awq_loss_alpha0"] and note["awq_loss"] <= note["awq_loss_identity"]


def test_transform_keeps_the_float_layer_function_before_clipping(make_tiny_llama) -> None:
    model = make_tiny_llama(layers=1, kv_heads=4)
    blocks = _blocks(n=4, seqlen=32)
    ctx = _context(model, blocks)
    layer = model.model.layers[0]
    with torch.no_grad():
        before = ctx.run(layer, keep=True)
        notes = AWQTransform(AWQConfig(SCHEME, clip=False)).apply(layer, ctx)
        after = ctx.run(layer, keep=True)
    assert any(n.get("awq_alpha") for n in notes.values())  # something was folded
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_linear_mapping_loss_equals_the_replayed_block_error(make_tiny_llama, monkeypatch) -> None:
    """up -> down is scored as tr(E H Eᵀ) / 2N from the Hessian; it must equal replaying down_proj on
    every captured token (the masked MSE that nonlinear blocks use)."""
    model = make_tiny_llama(layers=1)
    blocks = _blocks(n=8, seqlen=32, pad_tail=8)
    ctx = _context(model, blocks)
    layer = model.model.layers[0]
    losses: dict[str, list[float]] = {}
    import llmquant.transforms as tr

    real_search = tr.search_scales

    def spy(smooth, balance, x_mean, w_mean, loss_fn, n_grid):
        plan = real_search(smooth, balance, x_mean, w_mean, loss_fn, n_grid)
        losses[smooth] = [plan.loss_identity, *plan.losses]
        return plan

    monkeypatch.setattr(tr, "search_scales", spy)
    calls = ctx.capture_calls(layer, ["mlp.down_proj"], n_samples=8)["mlp.down_proj"]
    down = layer.mlp.down_proj
    w = down.weight.data.clone()
    AWQTransform(AWQConfig(SCHEME, n_grid=4, clip=False)).apply(layer, ctx)
    # replay the identity candidate: the float down_proj against its rounded weight, on every token
    from llmquant.grid import fake_quantize

    down.weight.data = fake_quantize(w, SCHEME)
    replayed = _masked_mse(ctx.replay(down, calls), calls)
    assert losses["mlp.up_proj"][0] == pytest.approx(replayed, rel=1e-4)


def _tiny_dir(make_tiny_llama, tmp_path: Path, **kw) -> Path:
    path = tmp_path / "float"
    make_tiny_llama(**kw).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "fmt,scheme",
    [
        ("awq", SCHEME),
        ("gptq_v2", SCHEME),
        ("compressed-tensors", SCHEME),
        ("gptq", QuantScheme(4, 32, True)),
        ("gptq_v2", QuantScheme(4, 48, False)),  # ragged last group (K = 64, 128)
        ("compressed-tensors", QuantScheme(4, 48, False)),
    ],
)
def test_awq_checkpoints_load_with_identical_logits(make_tiny_llama, tmp_path, fmt, scheme) -> None:
    blocks = _blocks(n=6, seqlen=32)
    result = pipeline.quantize(make_tiny_llama(), AWQConfig(scheme, n_grid=5), blocks, progress=False)
    with torch.no_grad():
        ref = result.model(blocks.input_ids).logits
    path = save_quantized(result, tmp_path / "q", format=fmt)
    loaded = from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(blocks.input_ids).logits, ref)
    meta = json.loads((path / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["method_config"]["method"] == "awq"


def test_awq_beats_rtn_and_awq_gptq_beats_both(make_tiny_llama) -> None:
    blocks = _blocks(n=8, seqlen=64)
    scheme = QuantScheme(3, 32, False)
    with torch.no_grad():
        ref = make_tiny_llama(kv_heads=4)(blocks.input_ids).logits
    errs = {}
    for cfg in (
        RTNConfig(scheme),
        AWQConfig(scheme),
        GPTQConfig(scheme, error_propagation=0.0),  # plain GPTQ both times: the composition is the claim
        AWQConfig(scheme, rounder=GPTQConfig(scheme, error_propagation=0.0)),
    ):
        result = pipeline.quantize(make_tiny_llama(kv_heads=4), cfg, blocks, progress=False)
        with torch.no_grad():
            errs[cfg.method] = (result.model(blocks.input_ids).logits - ref).pow(2).mean().item()
    assert errs["awq"] < errs["rtn"] and errs["awq+gptq"] < min(errs["awq"], errs["gptq"]), errs


@pytest.mark.parametrize("die_at", [1, 3])
def test_killed_awq_run_resumes_to_a_byte_identical_checkpoint(
    make_tiny_llama, tmp_path, monkeypatch, die_at
):
    model_dir = _tiny_dir(make_tiny_llama, tmp_path, layers=3, tie=False)
    cfg = AWQConfig(SCHEME, n_grid=5)
    full = pipeline.quantize(model_dir, cfg, _blocks(), progress=False)
    a = save_quantized(full, tmp_path / "a", format="awq")

    interrupt_run(monkeypatch, model_dir, cfg, tmp_path / "r", at_call=die_at)
    resumed = pipeline.quantize(model_dir, cfg, _blocks(), resume_dir=tmp_path / "r", progress=False)
    b = save_quantized(resumed, tmp_path / "b", format="awq")
    files = sorted(
        p.name for p in a.iterdir() if p.suffix in {".safetensors", ".json"} and p.name != "quant_log.json"
    )
    assert "model.safetensors" in files and "config.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
