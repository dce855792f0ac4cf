"""``from_pretrained``: load a quantized checkpoint (ours or another tool's, same formats) as a normal
transformers model whose quantized linears are ``QuantLinear`` modules.

config.json -> skeleton on the meta device (no float weights allocated) -> each quantized linear
replaced by a QuantLinear built from its packed tensors (format.unpack -> kernel layout) -> every
other tensor loaded in place -> tied weights re-tied. The result ``generate()``s like any model.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .arch import UnsupportedArchitectureError, get_arch
from .checkpoint import Checkpoint, read_config
from .formats import detect_format
from .formats.base import unpack_module
from .fuse import fuse_quant_linears
from .nn import QuantLinear, cache_dense_weights, set_module

logger = logging.getLogger(__name__)


def _skeleton(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, torch.dtype]:
    config = AutoConfig.from_pretrained(path)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we swap modules ourselves; transformers must not
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, dtype


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    fuse: bool | None = None,
    dequantize_cache: bool = False,
) -> PreTrainedModel:
    """Load a GPTQ / AWQ / compressed-tensors checkpoint directory into QuantLinear modules.

    ``fuse``: one matmul launch for the linears that share an input (q/k/v, gate/up; ``llmquant.fuse``).
    None (default) fuses on CUDA devices, where it saves kernel launches, and not elsewhere. Load with
    ``fuse=False`` to keep one module (and state_dict entry) per checkpoint linear.

    ``dequantize_cache``: for CPU inference, dequantize every quantized weight once and keep it as a
    dense float32 copy (``QuantLinear.cache_dense_weight``) instead of dequantizing on every forward:
    bitwise the same outputs, about the float model's speed, at 4 bytes per quantized weight of extra
    memory (425 MB for SmolLM2-135M). Refused (ValueError) on a CUDA device.
    """
    path = Path(path)
    if dequantize_cache and torch.device(device).type == "cuda":
        raise ValueError("dequantize_cache is for CPU inference; on CUDA the kernels read the packed weights")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    qcfg = read_config(path).get("quantization_config")
    if not qcfg:
        raise ValueError(
            f"{path} is not quantized (config.json has no quantization_config); load it with transformers"
        )
    fmt, scheme, _flags = detect_format(qcfg)
    model, dtype = _skeleton(path, dtype)
    with Checkpoint(path) as ckpt:
        qnames = fmt.quantized_module_names(ckpt.index)
        for name in tqdm(qnames, desc="loading quantized linears", disable=not progress):
            linear = model.get_submodule(name)
            tensors = ckpt.module_tensors(name, device=device)
            bias = tensors.pop("bias", None)
            where = f"{name} in {ckpt.index[ckpt.keys_of(name)[0]]}"
            qw = unpack_module(fmt, tensors, scheme, linear.out_features, linear.in_features, where)
            set_module(model, name, QuantLinear.from_quantized(qw, bias, dtype=dtype))
        quantized_keys = {k for n in qnames for k in ckpt.keys_of(n)}
        _load_plain_tensors(model, ckpt, [k for k in ckpt.index if k not in quantized_keys], dtype, device)
    model.to(device)
    model.eval()
    model.llmquant_quantization_config = qcfg
    if fuse or (fuse is None and torch.device(device).type == "cuda"):
        _fuse(model, required=bool(fuse))
    if dequantize_cache:
        cache_dense_weights(model)
    return model


def _fuse(model: PreTrainedModel, required: bool) -> None:
    try:
        arch = get_arch(model.config)
    except UnsupportedArchitectureError:
        if required:
            raise
        logger.info("not fusing linears: no ArchSpec for model_type %r", model.config.model_type)
        return
    logger.info("fused %d groups of linears that share an input", fuse_quant_linears(model, arch))


def _load_plain_tensors(
    model: PreTrainedModel, ckpt: Checkpoint, keys: list[str], dtype: torch.dtype, device: str | torch.device
) -> None:
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in ckpt.read(keys, device=device).items():
        if key not in expected:
            logger.debug("ignoring checkpoint tensor %s (no such parameter)", key)
            continue
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        set_module_tensor_to_device(model, key, device, value=value)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {ckpt.path} lacks tensors for {missing[:3]} ({len(missing)} missing)")
