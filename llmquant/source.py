"""Where the float model comes from: a loaded module, or a checkpoint streamed layer by layer.

``StreamedModel`` builds the model skeleton on the meta device (no float weights in memory), loads
only the tensors outside the decoder layers (embeddings, final norm, untied lm_head), and
materializes decoder layer ``i`` from the checkpoint's safetensors shards when the pipeline asks for
it. Host memory is then about one decoder layer plus the embeddings, not the whole model.

(design.md puts loading inside pipeline.py; it lives in its own file so the walker stays one
screen long and the loaded/streamed cases share one interface.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .arch import ArchSpec, get_arch

logger = logging.getLogger(__name__)


class ModelSource:
    """A causal LM whose decoder layers are handed out one at a time."""

    model: PreTrainedModel
    arch: ArchSpec
    description: str

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.layers)

    def load_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with real (float) weights, on the CPU."""
        return self.layers[index]


class LoadedModel(ModelSource):
    """A model already in memory (Python API)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.arch = get_arch(model.config)
        self.description = getattr(model.config, "_name_or_path", "") or type(model).__name__


class StreamedModel(ModelSource):
    """A local HF checkpoint: meta skeleton + per-layer streaming from its shards."""

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path} is not a model directory (no config.json); pass a local HF checkpoint"
            )
        config = AutoConfig.from_pretrained(self.path)
        self.arch = get_arch(config)
        if getattr(config, "quantization_config", None):
            raise ValueError(f"{self.path} is already quantized; quantize the float checkpoint instead")
        self.dtype = dtype or _config_dtype(config)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        from .io import read_checkpoint_index

        self.index = read_checkpoint_index(self.path)
        self.description = str(self.path)
        self._load_outside_layers()

    def _load_outside_layers(self) -> None:
        from .io import load_tensors

        prefix = self.arch.layers + "."
        names = [n for n in self.index if not n.startswith(prefix)]
        params = dict(self.model.named_parameters())
        for name, tensor in load_tensors(self.path, names).items():
            if name in params:
                set_module_tensor_to_device(self.model, name, "cpu", value=tensor.to(self.dtype).clone())
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.is_meta and not n.startswith(prefix)]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks tensors {missing[:3]}")

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        from .io import load_tensors

        prefix = f"{self.arch.layers}.{index}."
        tensors = load_tensors(self.path, [n for n in self.index if n.startswith(prefix)])
        # clone: safetensors hands out views of its mmap; a kept view (a norm weight) would pin the
        # whole shard's pages in RSS for the rest of the run
        state = {n[len(prefix) :]: t.to(self.dtype).clone() for n, t in tensors.items()}
        layer.load_state_dict(state, strict=False, assign=True)
        still_meta = [n for n, p in layer.named_parameters() if p.is_meta]
        if still_meta:
            raise ValueError(f"checkpoint {self.path} lacks {prefix}{still_meta[0]}")
        return layer


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float16
