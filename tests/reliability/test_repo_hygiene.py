"""The repository and the package are safe to work in and to load from: nothing in the repository root
shadows a package transformers probes for (the hub `kernels` library), nothing unpickles, and no
remote code runs unless asked."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = [*sorted((REPO / "llmquant").rglob("*.py")), *sorted((REPO / "llmquant_kernels").rglob("*.py"))]


def test_transformers_loads_a_model_from_the_repository_root(tiny_llama_dir) -> None:
    """transformers looks for the hub-kernels package (`find_spec("kernels")`, then imports it when it has
    no metadata); from the repository root that must not find a folder of ours."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})\n"
        "print(type(m).__name__)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # a local directory: nothing to fetch
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("LlamaForCausalLM")


def test_no_repository_folder_is_named_kernels() -> None:
    assert not (REPO / "kernels").exists()
    import llmquant.kernels

    assert Path(llmquant.kernels.__file__).parent == REPO / "llmquant_kernels"


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_nothing_unpickles() -> None:
    """Weights come from safetensors only: no pickle/marshal loads, torch.load only with weights_only=True."""
    bad = []
    for path in SOURCES:
        text = path.read_text()
        if "import pickle" in text or "import marshal" in text or "import dill" in text:
            bad.append(f"{path}: imports a pickle module")
        for call in _calls(path):
            name = _name(call)
            if name.endswith("torch.load") or name == "load" and "from torch import load" in text:
                kw = {k.arg: k.value for k in call.keywords}
                if not (
                    isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                ):
                    bad.append(f"{path}:{call.lineno}: {name} without weights_only=True")
            if name in {"pickle.load", "pickle.loads", "numpy.load", "np.load"}:
                bad.append(f"{path}:{call.lineno}: {name}")
    assert not bad, bad


def test_remote_code_is_off() -> None:
    """No call passes trust_remote_code other than False (the package never runs a model's own code)."""
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    bad.append(
                        f"{path}:{call.lineno}: {_name(call)}(trust_remote_code={ast.unparse(kw.value)})"
                    )
    assert not bad, bad
    assert "trust_remote_code=True" not in "".join(p.read_text() for p in SOURCES)
