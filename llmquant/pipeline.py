"""THE model walker: stream calibration activations through the model one decoder layer at a time.

1. capture: run the embeddings on every calibration batch and stop at decoder layer 0 (a pre-hook
   raises), keeping its hidden-state inputs (the activation cache, on the CPU) and the keyword
   arguments the installed transformers passes (attention mask, position ids, rotary embeddings,
   cache position ...).
2. for each decoder layer: load it (from the checkpoint shards when streaming), move it to the
   compute device, run the plan's transforms on the float layer (AWQ: scale, fold, clip), let the
   rounder quantize its linears (collecting statistics with hooks over the cached inputs), write the
   rounded weights back, run the inputs through the now-quantized layer to get the next layer's inputs,
   swap its linears for QuantLinear modules, move it back to the CPU, and write a resume checkpoint
   (codes, plus every float tensor of the layer a transform changed: folded norms, biases).
Only one float decoder layer plus the activation cache is ever resident on the compute device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .arch import ArchSpec
from .calibration import SYNTHETIC, CalibrationBlocks, load_calibration
from .config import CalibrationConfig, MethodConfig
from .faults import kill_point
from .layer import Call, LayerResult, ModuleLog
from .methods import LayerPlan, make_plan
from .nn import QuantLinear, set_module
from .numerics import check_finite_activations
from .qtensor import QuantizedWeight
from .resume import ResumeState
from .source import LoadedModel, ModelSource, StreamedModel
from .version import __version__

logger = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """The quantized model (QuantLinear modules swapped in, on the CPU) and what was done to it."""

    model: PreTrainedModel
    quantized: Mapping[str, QuantizedWeight]
    config: MethodConfig
    logs: list[ModuleLog] = field(default_factory=list)
    calibration: dict | None = None
    seconds: float = 0.0
    resume_dir: Path | None = None  # delete once the checkpoint is saved (``save_quantized`` does)
    fingerprint: str | None = None  # of the run's inputs (resume.ResumeState); written to quant_log.json


class _StopForward(Exception):
    pass


class QuantizedWeights(Mapping[str, QuantizedWeight]):
    """name -> QuantizedWeight, read on access from the model's QuantLinear modules, so the run keeps
    only the packed weights (~0.5 byte/weight at 4 bits), not a second, unpacked copy of the codes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self._model, self._names = model, names

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self._names:
            raise KeyError(name)
        return self._model.get_submodule(name).to_quantized()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class _Context:
    """LayerContext implementation over the activation cache."""

    index: int
    arch: ArchSpec
    inputs: list[torch.Tensor]  # per batch [b, S, H], on the CPU
    kwargs: list[dict]  # per batch, decoder-layer keyword arguments
    masks: list[torch.Tensor | None]  # per batch [b, S] bool (True = real token) or None
    device: torch.device
    dtype: torch.dtype
    float_inputs: list[torch.Tensor] | None = None  # the float model's stream (error propagation)
    float_layer: nn.Module | None = None  # this layer before rounding (set while it is quantized)
    float_outputs: list[torch.Tensor] | None = None  # float_layer on float_inputs, once computed

    def run(
        self,
        layer: nn.Module,
        keep: bool,
        on_batch: Callable[[int], None] | None = None,
        batches: int | None = None,
    ) -> list:
        """Every cached batch (or the first ``batches``) through ``layer``; the outputs (on the CPU) if
        ``keep``. A hook may raise _StopForward to end a batch early (nothing is kept for it then)."""
        outs = []
        for j, x in enumerate(self.inputs[:batches]):
            if on_batch is not None:
                on_batch(j)
            kwargs = {k: _to(v, self.device) for k, v in self.kwargs[j].items()}
            try:
                y = layer(x.to(self.device, self.dtype), **kwargs)
            except _StopForward:
                continue
            y = y[0] if isinstance(y, tuple) else y
            if keep:
                outs.append(y.to("cpu"))
        return outs

    def propagate(self, layer: nn.Module, stream: list[torch.Tensor] | None = None) -> None:
        """Every cached batch of ``stream`` (default: the quantized stream) through ``layer``, each
        batch's inputs overwritten by its outputs as soon as they exist: the activation cache is held
        once (plus one batch's working memory), not twice, and stays where it is (in memory, or in the
        mapped file of ``activation_buffers``)."""
        with torch.inference_mode():
            for j, x in enumerate(self.inputs if stream is None else stream):
                kwargs = {k: _to(v, self.device) for k, v in self.kwargs[j].items()}
                y = layer(x.to(self.device, self.dtype), **kwargs)
                x.copy_(y[0] if isinstance(y, tuple) else y)  # x is no longer needed

    def collect_inputs(
        self, layer: nn.Module, names: Sequence[str], fn: Callable[[str, torch.Tensor], None]
    ) -> None:
        """Feed ``fn`` the unpadded inputs of the named submodules. Each batch stops as soon as every
        named module has seen its input: collecting q_proj's input costs one norm, not a layer."""
        with torch.inference_mode():
            for j in range(len(self.inputs)):
                for name, x in self._module_inputs(layer, names, self.inputs, j).items():
                    fn(name, x)

    def collect_input_pairs(
        self,
        layer: nn.Module,
        names: Sequence[str],
        fn: Callable[[str, torch.Tensor, torch.Tensor], None],
    ) -> None:
        """As :meth:`collect_inputs`, with ``fn(name, X, X_float)``: the named submodules' inputs in
        ``layer`` on the quantized stream and, on the same tokens, in ``float_layer`` on the float
        stream (error-propagation GPTQ)."""
        if self.float_inputs is None or self.float_layer is None:
            raise RuntimeError("collect_input_pairs needs the float stream (error_propagation > 0)")
        with torch.inference_mode():
            for j in range(len(self.inputs)):
                ref = self._module_inputs(self.float_layer, names, self.float_inputs, j)
                for name, x in self._module_inputs(layer, names, self.inputs, j).items():
                    fn(name, x, ref[name])

    def _module_inputs(
        self, layer: nn.Module, names: Sequence[str], stream: list[torch.Tensor], j: int
    ) -> dict[str, torch.Tensor]:
        """name -> the unpadded input [real tokens, K] of each named submodule on batch ``j`` of
        ``stream``; the batch stops once all of them have been seen."""
        got: dict[str, torch.Tensor] = {}
        mask = self.masks[j]

        def hook(name: str) -> Callable:
            def _hook(_module: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1])  # [b, S, K] -> [b*S, K]
                got[name] = x if mask is None else x[mask.reshape(-1).to(x.device)]
                if len(got) == len(names):
                    raise _StopForward

            return _hook

        handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            kwargs = {k: _to(v, self.device) for k, v in self.kwargs[j].items()}
            with contextlib.suppress(_StopForward):
                layer(stream[j].to(self.device, self.dtype), **kwargs)
        finally:
            for h in handles:
                h.remove()
        return got

    def capture_calls(self, layer: nn.Module, names: Sequence[str], n_samples: int) -> dict[str, list[Call]]:
        """Arguments, keyword arguments and float outputs of each named submodule, on whole batches
        covering the first ``n_samples`` sequences (kept on the compute device)."""
        calls: dict[str, list[Call]] = {n: [] for n in names}
        state: dict = {"mask": None, "seen": set(), "args": {}}

        def pre(name: str) -> Callable:
            def _pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                state["args"][name] = (args, dict(kwargs))

            return _pre

        def post(name: str) -> Callable:
            def _post(_module: nn.Module, _args: tuple, _kwargs: dict, output: object) -> None:
                y = output[0] if isinstance(output, tuple) else output
                args, kwargs = state["args"].pop(name)
                calls[name].append(Call(args, kwargs, y, state["mask"]))
                state["seen"].add(name)
                if len(state["seen"]) == len(names):
                    raise _StopForward

            return _post

        n_batches, total = 0, 0
        while n_batches < len(self.inputs) and total < n_samples:
            total += self.inputs[n_batches].shape[0]
            n_batches += 1

        def set_batch(j: int) -> None:
            state["mask"], state["seen"] = self.masks[j], set()

        handles = []
        for n in names:
            module = layer.get_submodule(n)
            handles.append(module.register_forward_pre_hook(pre(n), with_kwargs=True))
            handles.append(module.register_forward_hook(post(n), with_kwargs=True))
        try:
            with torch.inference_mode():
                self.run(layer, keep=False, on_batch=set_batch, batches=n_batches)
        finally:
            for h in handles:
                h.remove()
        return calls

    def outputs(self, layer: nn.Module, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """``layer``'s outputs on every batch of ``stream`` (on the compute device)."""
        outs = []
        with torch.no_grad():
            for j, x in enumerate(stream):
                kwargs = {k: _to(v, self.device) for k, v in self.kwargs[j].items()}
                y = layer(x.to(self.device, self.dtype), **kwargs)
                outs.append((y[0] if isinstance(y, tuple) else y).clone())
        return outs

    def float_targets(self) -> list[torch.Tensor]:
        """``float_layer``'s outputs on the float stream, computed once per layer (refinement's targets;
        :meth:`advance_float` then moves the float stream to them instead of running the layer again)."""
        if self.float_outputs is None:
            assert self.float_layer is not None and self.float_inputs is not None
            self.float_outputs = self.outputs(self.float_layer, self.float_inputs)
        return self.float_outputs

    def advance_float(self) -> None:
        """Move the float stream past this layer (its outputs overwrite its inputs) and drop the layer."""
        assert self.float_layer is not None and self.float_inputs is not None
        if self.float_outputs is None:
            self.propagate(self.float_layer, self.float_inputs)
        else:
            for x, y in zip(self.float_inputs, self.float_outputs):
                x.copy_(y)
        self.float_layer = self.float_outputs = None

    def grad_batches(
        self, stream: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, dict, torch.Tensor | None]]:
        """(inputs, layer kwargs, mask) of every batch of ``stream`` on the compute device, as ordinary
        tensors (copies of the cache's inference-mode ones) that autograd may save (refinement)."""
        out = []
        for j, x in enumerate(stream):
            kwargs = {k: _clone(_to(v, self.device)) for k, v in self.kwargs[j].items()}
            mask = self.masks[j]
            out.append(
                (
                    x.to(self.device, self.dtype).clone(),
                    kwargs,
                    None if mask is None else mask.to(self.device),
                )
            )
        return out

    def replay(self, module: nn.Module, calls: Sequence[Call]) -> list[torch.Tensor]:
        outs = []
        with torch.inference_mode():
            for call in calls:
                y = module(*call.args, **call.kwargs)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    def write_back(self, layer: nn.Module, result: LayerResult) -> None:
        for name, (qw, _log) in result.items():
            weight = layer.get_submodule(name).weight
            weight.data = qw.dequantize().to(weight.device, weight.dtype)


def _to(value: object, device: torch.device) -> object:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


def _outside_modules(source: ModelSource) -> list[nn.Module]:
    """Children of the base model other than the decoder layers (embeddings, rotary, norm)."""
    base_path, _, layers_name = source.arch.layers.rpartition(".")
    base = source.model.get_submodule(base_path)
    return [m for n, m in base.named_children() if n != layers_name]


def capture_layer_inputs(
    source: ModelSource,
    blocks: CalibrationBlocks,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    buffers: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[dict], list[torch.Tensor | None]]:
    """Decoder-layer-0 inputs and kwargs for every calibration batch (inputs kept on the CPU, copied into
    ``buffers`` when given: see :func:`activation_buffers`)."""
    captured: dict = {}

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        captured["x"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    outside = _outside_modules(source)
    # parameterless modules (rotary embeddings) keep their float32 buffers: move, don't cast
    # (remember dtypes, not parameters: Module.to converts a parameter in place, so its dtype changes)
    saved = [(m, getattr(next(m.parameters(), None), "dtype", None)) for m in outside]
    for m, p_dtype in saved:
        m.to(device=device, dtype=dtype if p_dtype is not None else None)
    handle = source.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    inputs, kwargs_list, masks = [], [], []
    try:
        for start in range(0, blocks.input_ids.shape[0], batch_size):
            ids = blocks.input_ids[start : start + batch_size]
            mask = blocks.attention_mask[start : start + batch_size]
            padded = bool((mask == 0).any())
            with torch.inference_mode(), contextlib.suppress(_StopForward):
                source.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device) if padded else None,
                    use_cache=False,
                )
            x = captured.pop("x")
            inputs.append(x.to("cpu") if buffers is None else buffers[len(inputs)].copy_(x))
            kwargs_list.append({k: _to(v, torch.device("cpu")) for k, v in captured["kwargs"].items()})
            masks.append(mask.bool() if padded else None)
            kill_point("capture.batch")
    finally:
        handle.remove()
        for m, p_dtype in saved:
            m.to(device="cpu", dtype=p_dtype)
    return inputs, kwargs_list, masks


ACTIVATION_CACHE = "activations.cache"
FLOAT_ACTIVATION_CACHE = "activations-float.cache"  # the float stream (error propagation), offloaded


def activation_buffers(
    shape: torch.Size, hidden: int, batch_size: int, dtype: torch.dtype, file: Path | None = None
) -> list[torch.Tensor]:
    """Empty [b, seqlen, hidden] buffers for the activation cache of ``shape`` = [n, seqlen] calibration
    tokens in batches of ``batch_size``: in memory, or (``file``) views of that file mapped shared, whose
    pages the kernel writes back and may evict under memory pressure (the cache then costs disk reads,
    not memory)."""
    n, seqlen = shape
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if file is None:
        return [torch.empty(b, seqlen, hidden, dtype=dtype) for b in sizes]
    flat = torch.from_file(str(file), shared=True, size=n * seqlen * hidden, dtype=dtype)
    return [
        part.view(b, seqlen, hidden)
        for part, b in zip(flat.split([b * seqlen * hidden for b in sizes]), sizes)
    ]


def _resolve_source(model: PreTrainedModel | ModelSource | str | Path) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, (str, Path)):
        return StreamedModel(model)
    return LoadedModel(model)


def _resolve_blocks(
    calibration: CalibrationBlocks | CalibrationConfig | None, tokenizer, source: ModelSource
) -> CalibrationBlocks:
    if isinstance(calibration, CalibrationBlocks):
        return calibration
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer: pass tokenizer=... or CalibrationBlocks")
    calibration = calibration or CalibrationConfig()
    if calibration.source != SYNTHETIC:
        return load_calibration(calibration, tokenizer, model=source.model)
    with source.whole_model() as whole:  # a streamed source's skeleton holds no layer weights
        return load_calibration(calibration, tokenizer, model=whole)


def _finalize_layer(layer: nn.Module, result: LayerResult, dtype: torch.dtype) -> None:
    """Swap each quantized linear for a QuantLinear and move the layer back to the CPU (mutates)."""
    for name, (qw, _log) in result.items():
        linear = layer.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.detach().to("cpu", dtype)
        set_module(layer, name, QuantLinear.from_quantized(qw.to("cpu"), bias, dtype=dtype))
    layer.to(device="cpu", dtype=dtype)


def quantize(
    model: PreTrainedModel | ModelSource | str | Path,
    config: MethodConfig,
    calibration: CalibrationBlocks | CalibrationConfig | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    resume_dir: str | Path | None = None,
    progress: bool = True,
    offload_activations: bool = False,
) -> QuantizationResult:
    """Quantize every decoder-layer linear of ``model`` (a loaded model or a checkpoint path).

    ``calibration`` (blocks or a config; needs ``tokenizer``) is used by calibrated methods (GPTQ, AWQ).
    Computation runs on ``device`` (default: CUDA if available) in the model's dtype there, in float32
    on the CPU. With ``resume_dir``, every finished layer is checkpointed and an interrupted run
    with the same inputs continues where it stopped, bit-identically. ``offload_activations`` keeps the
    activation cache in a file of ``resume_dir`` mapped into memory (``activation_buffers``), for runs
    whose cache does not fit in memory; the results are the same bytes.
    """
    t0 = time.perf_counter()
    source = _resolve_source(model)
    plan = make_plan(config)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store_dtype = next(p for p in source.model.parameters() if not p.is_meta).dtype
    compute_dtype = torch.float32 if dev.type == "cpu" else store_dtype
    blocks = _resolve_blocks(calibration, tokenizer, source) if plan.needs_calibration else None
    parts = {
        "llmquant version": __version__,
        "model": [source.description, source.content],
        "method config": [config.method, config.to_dict()],
        "calibration data": blocks.fingerprint if blocks else None,
        "batch size / compute dtype": [batch_size, str(compute_dtype)],
    }
    state = ResumeState(Path(resume_dir) if resume_dir else None, parts, {"batch_size": batch_size})
    ctx = None
    if blocks is not None:
        float_stream = plan.needs_float_stream
        ctx = _calibration_context(
            source, blocks, state, batch_size, dev, compute_dtype, offload_activations, float_stream
        )
    quantized: list[str] = []
    logs: list[ModuleLog] = []
    bar = tqdm(range(len(source.layers)), desc=f"{config.method} layers", disable=not progress)
    for i in bar:
        layer = source.load_layer(i)
        if i < state.layers_done:
            result, float_state = state.load_layer(i)
            _assign_(layer, float_state)
        else:
            result = _quantize_layer(layer, i, plan, ctx, source.arch, dev, compute_dtype)
            float_state = _transformed_tensors(layer, result) if plan.transforms else {}
            state.save_layer(
                i, result, ctx.inputs if ctx else None, float_state, ctx.float_inputs if ctx else None
            )
        _finalize_layer(layer, result, store_dtype)
        prefix = f"{source.arch.layers}.{i}."
        for name, (_qw, log) in result.items():
            quantized.append(prefix + name)
            logs.append(dataclasses.replace(log, name=prefix + name))
        losses = [log.hessian_error for _, log in result.values() if log.hessian_error is not None]
        if losses:
            bar.set_postfix(error=f"{max(losses):.3g}")
    calib = (
        None
        if blocks is None
        else {
            "source": blocks.source,
            "fingerprint": blocks.fingerprint,
            "n_samples": int(blocks.input_ids.shape[0]),
            "seqlen": int(blocks.input_ids.shape[1]),
        }
    )
    seconds = time.perf_counter() - t0
    weights = QuantizedWeights(source.model, quantized)
    return QuantizationResult(source.model, weights, config, logs, calib, seconds, state.dir, state.fp)


def _calibration_context(
    source: ModelSource,
    blocks: CalibrationBlocks,
    state: ResumeState,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool,
    float_stream: bool = False,
) -> _Context:
    """The activation cache (layer 0's inputs, or a resumed run's saved activations), in memory or in
    ``ACTIVATION_CACHE`` of the resume directory (``offload``); with ``float_stream``, a second cache
    for the float model's activations (error-propagation GPTQ)."""
    if offload and state.dir is None:
        raise ValueError("offload_activations needs resume_dir (the cache file is kept there)")
    file = state.dir / ACTIVATION_CACHE if offload and state.dir else None
    hidden = source.model.config.hidden_size
    buffers = activation_buffers(blocks.input_ids.shape, hidden, batch_size, dtype, file)
    inputs, kwargs, masks = capture_layer_inputs(source, blocks, batch_size, device, dtype, buffers)
    float_inputs = None
    if float_stream:  # layer 0's inputs are the same in both streams
        file = state.dir / FLOAT_ACTIVATION_CACHE if offload and state.dir else None
        float_inputs = activation_buffers(blocks.input_ids.shape, hidden, batch_size, dtype, file)
        for buffer, x in zip(float_inputs, inputs):
            buffer.copy_(x)
    if state.layers_done:
        state.load_activations(into=inputs, float_into=float_inputs)
    return _Context(0, source.arch, inputs, kwargs, masks, device, dtype, float_inputs)


def _transformed_tensors(layer: nn.Module, result: LayerResult) -> dict[str, torch.Tensor]:
    """Every float parameter of ``layer`` except the quantized linears' weights (norms, biases): what a
    transform may have changed, saved for resume so a resumed layer is not re-streamed over them."""
    skip = {f"{name}.weight" for name in result}
    return {n: p.detach().to("cpu").clone() for n, p in layer.named_parameters() if n not in skip}


def _assign_(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved float tensors back into ``layer`` (in place, keeping each parameter's dtype)."""
    for name, value in tensors.items():
        param = layer.get_parameter(name)
        param.data = value.to(param.device, param.dtype)


def _quantize_layer(
    layer: nn.Module,
    index: int,
    plan: LayerPlan,
    ctx: _Context | None,
    arch: ArchSpec,
    device: torch.device,
    dtype: torch.dtype,
) -> LayerResult:
    """Transform and round one layer on the compute device; advance ``ctx.inputs`` to its quantized
    outputs. The pipeline writes the rounded weights back before propagating."""
    if ctx is None:  # nothing runs through the layer: move it, keep its dtype
        layer.to(device=device)
        return plan.rounder.quantize_layer(layer, _Context(index, arch, [], [], [], device, dtype))
    layer.to(device=device, dtype=dtype)
    kill_point("layer.loaded")
    ctx.index = index
    notes: dict[str, dict] = {}
    for transform in plan.transforms:
        for name, note in transform.apply(layer, ctx).items():
            notes.setdefault(name, {}).update(note)
        kill_point("layer.transformed")
    if ctx.float_inputs is not None:  # the float reference is the transformed (equivalent) layer
        ctx.float_layer = copy.deepcopy(layer)
    result = plan.rounder.quantize_layer(layer, ctx)
    kill_point("layer.rounded")
    if plan.refiner is not None:
        result = plan.refiner.refine(layer, result, ctx)
    ctx.write_back(layer, result)
    ctx.propagate(layer)
    check_finite_activations(ctx.inputs, index, dtype)
    if ctx.float_layer is not None:
        ctx.advance_float()
        check_finite_activations(ctx.float_inputs, index, dtype)
    kill_point("layer.propagated")
    if notes:
        result = {
            n: (qw, dataclasses.replace(log, transform=notes.get(n) or None))
            for n, (qw, log) in result.items()
        }
    return result
