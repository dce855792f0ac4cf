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
SOURCES = [*sorted((REPO / "llmquant").rglob("*.py")), *sorted((REPO / "kernels").rglob("*.py"))]


def _hub_kernels_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return False
    return True


def _run_from_root(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))  # a local directory: nothing to fetch
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_transformers_loads_a_model_from_the_repository_root(tiny_llama_dir) -> None:
    """transformers probes for the hub-kernels library (``kernels``; transformers >= 5.25 requires it and
    imports names from it); from the repository root `import kernels` finds our folder first. Installed,
    the library must be what `import kernels` gives; not installed, our folder must look like no
    library at all (no version, nothing imported with it)."""
    installed = _hub_kernels_installed()
    ours = str(REPO / "kernels" / "__init__.py")
    code = (
        "import importlib.util, sys\n"
        f"assert importlib.util.find_spec('kernels').origin == {ours!r}  # the folder is seen first\n"
        "import kernels\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
    )
    if installed:
        code += (
            "assert hasattr(kernels, '__version__'), kernels.__file__\n"
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "assert is_kernels_available()\n"
        )
    else:
        code += "assert not hasattr(kernels, '__version__')\nassert not is_kernels_available()\n"
    code += f"m = AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})\nprint(type(m).__name__)\n"
    proc = _run_from_root(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("LlamaForCausalLM")


def test_our_kernels_folder_hands_over_to_an_installed_hub_library(tmp_path) -> None:
    """A stand-in hub library (a dist-info named ``kernels``) ahead on sys.path: from the repository root
    `import kernels` and `from kernels.sub import X` load it, not our folder; without it, our folder
    imports as a package with no version that pulls in nothing."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.99'\nfrom .sub import THING\n")
    (site / "kernels" / "sub.py").write_text("THING = 'hub'\n")
    info = site / "kernels-0.99.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.99\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\nkernels/sub.py,,\n")
    code = (
        "import sys, kernels\nfrom kernels.sub import THING\n"
        "assert kernels.__version__ == '0.99' and THING == 'hub', kernels.__file__\n"
        "assert sys.modules['kernels'] is kernels\n"
        "assert not {'torch', 'triton', 'llmquant'} & set(sys.modules)\nprint('ok')\n"
    )
    proc = _run_from_root(code, {"PYTHONPATH": str(site)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    if not _hub_kernels_installed():
        code = (
            "import sys, kernels\nassert not hasattr(kernels, '__version__')\n"
            "assert not {'torch', 'triton', 'llmquant'} & set(sys.modules)\nprint('ok')\n"
        )
        proc = _run_from_root(code)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_kernels_folder_is_installed_as_llmquant_kernels() -> None:
    import llmquant.kernels

    assert Path(llmquant.kernels.__file__).parent == REPO / "kernels"


def test_kernels_depend_on_nothing_above_them() -> None:
    """``kernels/`` imports torch and triton only: nothing of llmquant (the layering of design.md)."""
    bad = []
    for path in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "llmquant"]
    assert not bad, bad


def test_quantize_and_load_on_cpu_do_not_import_triton(tiny_llama_dir, tmp_path) -> None:
    """RTN quantization, saving, from_pretrained and a forward pass on the CPU import none of our Triton
    modules (transformers' model code imports the triton package itself, through torch's flex attention
    and dynamo, so that package's presence in sys.modules says nothing about us)."""
    out = tmp_path / "q"
    code = (
        "import sys, torch, llmquant\n"
        "from llmquant.api import quantize_checkpoint\n"
        "from llmquant.config import QuantScheme, RTNConfig\n"
        f"quantize_checkpoint({str(tiny_llama_dir)!r}, {str(out)!r}, RTNConfig(QuantScheme(4, 32, True)))\n"
        f"m = llmquant.from_pretrained({str(out)!r}, dtype=torch.float32, progress=False)\n"
        "m(torch.ones(1, 4, dtype=torch.long))\n"
        "ours = {'_jit', '_launch', 'configs', 'dequant', 'gemm', 'gemv', 'tuning'}\n"
        "bad = [k for k in sys.modules if k.startswith('llmquant.kernels.') and k.split('.')[-1] in ours]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


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


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of llmquant and llmquant.kernels it imports (module level or inside a
    function: a lazy import that closes a loop is still a loop)."""
    roots = {"llmquant": REPO / "llmquant", "llmquant.kernels": REPO / "kernels"}
    mods: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = (path, path.name == "__init__.py")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")
                base = base if node.level else node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def test_no_import_cycles() -> None:
    graph = _module_graph()
    assert graph["llmquant.methods"] and graph["llmquant.kernels.gemm"]  # the walk sees imports
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_function_over_80_lines_outside_jit_kernels() -> None:
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                jit = any("triton" in ast.unparse(d) for d in node.decorator_list)
                if not jit and node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
