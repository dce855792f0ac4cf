"""Fuse quantized linears that read the same input (q/k/v, gate/up) into one matmul launch.

``ArchSpec.sequential`` already lists which linears of a decoder layer share their input. For each such
group of ``QuantLinear`` modules with equal in_features, bits, group_size and act-order permutation,
``fuse_quant_linears`` concatenates their kernel layouts along N (``kernels.concat_layouts``) into one
``FusedQuantLinear``, registered on the group's parent module as ``fused_<names>``. Each original
attribute (``q_proj``, ...) becomes a ``QuantLinearPart`` so the model's own forward code is unchanged.

How a part computes its output:

- Eager (and CUDA-graph capture of eager code): the first part called with an input computes the whole
  fused product in one launch and keeps it; the other parts called with the same tensor object, not
  modified in place since (its version counter), get column slices of it. Every part is served once per
  product; a part asked again, or asked with another input, recomputes. So the result is always that
  of the part's own columns; fusion only removes launches.
- Under ``torch.compile`` (no Python-side caching in a traced graph) each part runs the matmul on column
  views of the fused buffers: the same cost as unfused linears, and still correct.

The fused model's ``state_dict`` names the fused buffers (``self_attn.fused_q_proj_k_proj_v_proj.qweight``,
...), so a model to be saved again should be loaded with ``fuse=False``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .arch import ArchSpec
from .kernels import concat_layouts, quant_matmul
from .nn import QuantLinear, set_module

logger = logging.getLogger(__name__)


class FusedQuantLinear(QuantLinear):
    """One QuantLinear over the concatenated outputs of ``parts`` (their out_features, in order)."""

    def __init__(self, parts: list[QuantLinear]) -> None:
        first = parts[0]
        layout = concat_layouts([_layout(p) for p in parts])
        has_bias = any(p.bias is not None for p in parts)
        dtype = next((p.bias.dtype for p in parts if p.bias is not None), torch.float16)
        super().__init__(
            first.in_features, sum(p.out_features for p in parts), bits=first.bits,
            group_size=first.group_size, bias=has_bias, act_order=layout["perm"] is not None, dtype=dtype,
            device="meta",
        )  # fmt: skip
        self.qweight, self.scales, self.zeros, self.perm = (
            layout["qweight"], layout["scales"], layout["zeros"], layout["perm"],
        )  # fmt: skip
        if has_bias:
            biases = [p.bias if p.bias is not None else p.scales.new_zeros(p.out_features) for p in parts]
            self.bias = torch.cat([b.to(dtype) for b in biases])
        self.splits = tuple(p.out_features for p in parts)
        self.offsets = tuple(sum(self.splits[:i]) for i in range(len(parts)))
        self._cache: tuple[torch.Tensor, int, torch.Tensor, set[int]] | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output columns of part ``index`` for input x (see the module docstring)."""
        lo, hi = self.offsets[index], self.offsets[index] + self.splits[index]
        if torch.compiler.is_compiling():  # column views of the fused buffers, no Python-side cache
            return quant_matmul(
                x, self.qweight[:, lo:hi], self.scales[:, lo:hi], self.zeros[:, lo:hi], self.bits,
                self.effective_group_size, self.perm, None if self.bias is None else self.bias[lo:hi],
            )  # fmt: skip
        cache = self._cache
        if cache is None or cache[0] is not x or cache[1] != x._version or index in cache[3]:
            cache = (x, x._version, self.forward(x), set())
        cache[3].add(index)
        self._cache = None if len(cache[3]) == len(self.splits) else cache
        return cache[2][..., lo:hi]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", splits={self.splits}"


class QuantLinearPart(nn.Module):
    """Stands where one fused linear was; forwards to its columns of the shared FusedQuantLinear."""

    def __init__(self, fused: FusedQuantLinear, index: int) -> None:
        super().__init__()
        self._fused = (fused,)  # a tuple: not registered here (the parent owns the fused module)
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.splits[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of the fused linear, out_features={self.out_features}"


def _layout(module: QuantLinear) -> dict[str, torch.Tensor | None]:
    return {"qweight": module.qweight, "scales": module.scales, "zeros": module.zeros, "perm": module.perm}


def _fusable(modules: list[nn.Module]) -> str | None:
    """None if the modules can share one launch, else why not."""
    if not all(type(m) is QuantLinear for m in modules):
        return "not all are QuantLinear"
    if len({(m.in_features, m.bits, m.group_size) for m in modules}) > 1:
        return "in_features, bits or group_size differ"
    p0 = modules[0].perm
    same = [(m.perm is None) == (p0 is None) and (p0 is None or torch.equal(m.perm, p0)) for m in modules]
    if not all(same):
        return "act-order permutations differ"
    return None


def fuse_quant_linears(model: nn.Module, arch: ArchSpec) -> int:
    """Fuse every fusable multi-linear group of ``arch.sequential`` in each decoder layer; returns how
    many groups were fused (groups that cannot be fused are left alone and logged)."""
    layers = model.get_submodule(arch.layers)
    fused_count = 0
    for i, layer in enumerate(layers):
        for group in arch.sequential:
            if len(group) < 2:
                continue
            modules = [layer.get_submodule(name) for name in group]
            why = _fusable(modules)
            if why is not None:
                logger.info("layer %d: not fusing %s (%s)", i, ", ".join(group), why)
                continue
            parents = {name.rpartition(".")[0] for name in group}
            parent = parents.pop() if len(parents) == 1 else ""
            fused = FusedQuantLinear(modules)
            attr = "fused_" + "_".join(name.rpartition(".")[2] for name in group)
            set_module(layer, f"{parent}.{attr}" if parent else attr, fused)
            for index, name in enumerate(group):
                set_module(layer, name, QuantLinearPart(fused, index))
            fused_count += 1
    return fused_count
