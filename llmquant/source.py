"""Where the float model comes from: a loaded module, or a checkpoint streamed layer by layer.

``StreamedModel`` builds the model skeleton on the meta device (no float weights in memory), loads
only the tensors outside the decoder layers (embeddings, final norm, untied lm_head), and
materializes decoder layer ``i`` from the checkpoint's safetensors shards when the pipeline asks for
it. Host memory is then about one decoder layer plus the embeddings, not the whole model.

(design.md puts loading inside pipeline.py; it lives in its own file so the walker stays one
screen long and the loaded/streamed cases share one interface.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .arch import ArchSpec, get_arch
from .errors import ModelConfigError, WeightsError

logger = logging.getLogger(__name__)


class ModelSource:
    """A causal LM whose decoder layers are handed out one at a time."""

    model: PreTrainedModel
    arch: ArchSpec
    description: str
    content: str | None = None  # cheap fingerprint of the weights (checkpoint headers), for resume

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.layers)

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with real (float) weights, on the CPU."""
        return self.layers[index]

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[PreTrainedModel]:
        """The complete float model (synthetic calibration samples text from it)."""
        yield self.model


class LoadedModel(ModelSource):
    """A model already in memory (Python API)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.arch = get_arch(model.config)
        self.description = getattr(model.config, "_name_or_path", "") or type(model).__name__


class StreamedModel(ModelSource):
    """A local HF checkpoint: meta skeleton + per-layer streaming from its shards."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        from .preflight import check_architecture, content_fingerprint, read_model_config

        self.path = Path(path)
        raw = read_model_config(self.path)  # one-line errors: missing, unreadable, invalid JSON
        check_architecture(raw, self.path)
        if raw.get("quantization_config"):
            raise ModelConfigError(f"{self.path} is already quantized; quantize the float checkpoint instead")
        try:
            config = AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ModelConfigError(f"{self.path}/config.json cannot be read by transformers: {exc}") from exc
        self.arch = get_arch(config)
        self.dtype = dtype or _config_dtype(config)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        from .checkpoint import Checkpoint

        self.checkpoint = Checkpoint(self.path)
        self.index = self.checkpoint.index
        self.description = str(self.path)
        self.content = content_fingerprint(self.path)
        self._load_outside_layers()

    def _load_outside_layers(self) -> None:
        prefix = self.arch.layers + "."
        names = [n for n in self.index if not n.startswith(prefix)]
        params = dict(self.model.named_parameters())
        for name, tensor in self.checkpoint.read(names).items():
            check_finite(name, tensor, self.index[name])
            if name in params:
                set_module_tensor_to_device(self.model, name, "cpu", value=tensor.to(self.dtype).clone())
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks tensors {missing[:3]}")

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        prefix = f"{self.arch.layers}.{index}."
        tensors = self.checkpoint.read([n for n in self.index if n.startswith(prefix)])
        for name, tensor in tensors.items():
            check_finite(name, tensor, self.index[name])
        # clone: safetensors hands out views of its mmap; a kept view (a norm weight) would pin the
        # whole shard's pages in RSS for the rest of the run
        state = {n[len(prefix) :]: t.to(self.dtype).clone() for n, t in tensors.items()}
        layer.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, p in layer.named_parameters() if p.is_meta]
        if still_meta:
            raise ValueError(f"checkpoint {self.path} lacks {prefix}{still_meta[0]}")
        return layer

    @contextlib.contextmanager
    def whole_model(self) -> Iterator[PreTrainedModel]:
        """The complete float model, loaded for as long as the caller needs it (synthetic calibration
        samples text from it): float32 on the CPU, refused in one line when it does not fit in memory."""
        from .calibration import CalibrationError
        from .checkpoint import checkpoint_tensors
        from .preflight import GiB, available_memory

        needed = sum(t.numel for t in checkpoint_tensors(self.path).values()) * 4
        available = available_memory()
        if needed > 0.8 * available:
            raise CalibrationError(
                f"--calib synthetic samples text from the whole float model, which needs {needed / GiB:.1f} "
                f"GiB of memory here ({available / GiB:.1f} GiB available); pass --calib PATH or a recipe"
            )
        logger.info("loading the whole model (%.2f GiB) to sample synthetic calibration text", needed / GiB)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        try:
            yield model.eval()
        finally:
            del model


def check_finite(name: str, tensor: torch.Tensor, file: Path | str) -> None:
    """WeightsError naming the tensor when a float weight holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise WeightsError(
            f"weight {name} in {file} holds {bad} NaN/inf values; the checkpoint is corrupted or was saved "
            "after a diverged training step: use another copy of the model"
        )


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float16
