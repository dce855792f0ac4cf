"""How each grid choice does on real layers, by the output-error proxy: tr((W - Q) H (W - Q)ᵀ).

Collects the input Hessians H = XᵀX / n of q_proj, o_proj, gate_proj and down_proj in a few decoder
layers of the float model (calibration text, float inputs, one forward), then quantizes those weights
with RTN and with GPTQ under each grid (``--grids``; ``search`` at each exponent of ``--norms``) and
prints each total Hessian error relative to min-max. Minutes on a 2-core CPU for SmolLM2-135M; a
proxy for choosing defaults, not a perplexity (bench_quality.py measures that).

    python scripts/grid_study.py [--model DIR] [--calib FILE] [--layers 0,3,10,20,29] [--norms 2,3,4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def collect(model_dir: str, calib: str, layers: list[int], n: int, seqlen: int) -> dict:
    """(W float32, H normalised) per studied linear, from one forward of n x seqlen calibration tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(Path(calib).read_text(), return_tensors="pt").input_ids[0][: n * seqlen].reshape(n, seqlen)
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # [tokens, K]
            sums[name] = sums.get(name, 0) + x.T @ x

        return add

    for i in layers:
        for lin in LINEARS:
            model.model.layers[i].get_submodule(lin).register_forward_pre_hook(hook(f"{i}.{lin}"))
    with torch.no_grad():
        for b in range(0, n, 4):
            model(ids[b : b + 4])
    weights = {
        k: model.model.layers[int(k.split(".")[0])].get_submodule(k.split(".", 1)[1]).weight for k in sums
    }
    return {k: (weights[k].data.float().clone(), (sums[k] / (n * seqlen)).float()) for k in sums}


def study(problems: dict, bits: int, group_size: int, grids: list[str], norms: list[float]) -> list[tuple]:
    from llmquant import grid as grid_module
    from llmquant.config import GPTQConfig, QuantScheme
    from llmquant.gptq import gptq_quantize, hessian_weighted_error
    from llmquant.grid import quantize_weight

    variants = [(g, None) for g in grids if g != "search"]
    variants += [("search", p) for p in norms] if "search" in grids else []
    rows = []
    for sym in (True, False):
        scheme = QuantScheme(bits, group_size, sym)
        totals: dict[str, list[float]] = {}
        for grid, norm in variants:
            label = grid if norm is None else f"search L{norm:g}"
            saved = grid_module.SEARCH_NORM
            grid_module.SEARCH_NORM = norm if norm is not None else saved
            rtn = gptq = 0.0
            for W, H in problems.values():
                imp = torch.diagonal(H).clone()
                q = quantize_weight(W, scheme, grid=grid, importance=imp).dequantize()
                rtn += hessian_weighted_error(W, q, H)
                gptq += gptq_quantize(W, H, GPTQConfig(scheme, grid=grid)).hessian_error
            grid_module.SEARCH_NORM = saved
            totals[label] = [rtn, gptq]
        base = totals["minmax"]
        for label, (rtn, gptq) in totals.items():
            rows.append(("sym" if sym else "asym", label, rtn / base[0], gptq / base[1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "llmquant" / "smollm2-135m-instruct"))
    p.add_argument("--calib", default=str(REPO.parent / "shared" / "data" / "calibration" / "c4.utf8"))
    p.add_argument("--layers", default="0,3,10,20,29")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--grids", default="minmax,mse,search")
    p.add_argument("--norms", default="2,3,4", help="exponents tried for the search grid")
    args = p.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    problems = collect(args.model, args.calib, layers, args.n_samples, args.seqlen)
    norms = [float(x) for x in args.norms.split(",")]
    rows = study(problems, args.bits, args.group_size, args.grids.split(","), norms)
    print(f"w{args.bits} g{args.group_size}, layers {args.layers}: Hessian error relative to min-max")
    print("| grid | grid choice | RTN | GPTQ |\n|---|---|---|---|")
    for sym, label, rtn, gptq in rows:
        print(f"| {sym} | {label} | {rtn:.3f} | {gptq:.3f} |")


if __name__ == "__main__":
    main()
