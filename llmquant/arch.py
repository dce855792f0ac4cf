"""Declarative per-family tables: where the decoder layers are and how their linears are grouped.

Adding a family is adding an ``ArchSpec`` to ``ARCHS`` — no code paths per architecture elsewhere.

- ``layers``: dotted path of the decoder-layer ModuleList.
- ``sequential``: GPTQ's true-sequential groups, in order; the modules of one group read the same
  input (so they share one Hessian), and each group sees the already-quantized earlier groups.
- ``awq``: AWQ mappings, smooth module -> the linears it feeds (scales folded into the smooth module),
  in the reference implementations' order; a mapping whose shapes do not allow folding (v_proj -> o_proj
  under grouped-query attention) is skipped at run time with the reason (``transforms.skip_reason``).
- ``awq_no_clip``: linears AWQ does not clip (q/k: their outputs meet in the attention scores, where a
  per-linear output error says little; the reference implementations skip them too).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


class UnsupportedArchitectureError(ValueError):
    """The model family has no ArchSpec."""


@dataclass(frozen=True)
class AWQMapping:
    smooth: str  # module whose output feeds the balanced linears (a norm or a linear)
    balance: tuple[str, ...]  # linears whose input channels are scaled
    inspect: str  # module whose output measures the effect (the block the balanced linears sit in)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layers: str
    sequential: tuple[tuple[str, ...], ...]
    awq: tuple[AWQMapping, ...]
    awq_no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a decoder layer, relative to the layer."""
        return tuple(name for group in self.sequential for name in group)


_LLAMA_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_AWQ = (
    AWQMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    AWQMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    AWQMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    AWQMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

_LLAMA_LIKE = ArchSpec("llama", "model.layers", _LLAMA_SEQUENTIAL, _LLAMA_AWQ)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA_SEQUENTIAL, _LLAMA_AWQ),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA_SEQUENTIAL, _LLAMA_AWQ),
    "qwen3": ArchSpec("qwen3", "model.layers", _LLAMA_SEQUENTIAL, _LLAMA_AWQ),
}


def get_arch(config: PretrainedConfig) -> ArchSpec:
    """The ArchSpec for ``config.model_type``; a one-line error naming what to add otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHS))}); "
            "add an ArchSpec for it to llmquant/arch.py"
        )
    return ARCHS[model_type]
