"""Checkpoint: the index parsed once, each shard opened once, tensors served by name and by module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmquant.checkpoint as checkpoint_mod
from llmquant.checkpoint import Checkpoint, MissingTensorError, load_tensors, read_checkpoint_index
from llmquant.errors import CheckpointError
from llmquant.io import write_checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.a.qweight": torch.randint(-(2**31), 2**31 - 1, (8, 16), dtype=torch.int32, generator=g),
        "model.a.scales": torch.randn(2, 16, generator=g).half(),
        "model.a.bias": torch.randn(16, generator=g),
        "model.b.weight": torch.randn(32, 32, generator=g),  # 4 KiB: its own shard below
        "model.norm.weight": torch.randn(16, generator=g),
    }


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", _tensors(), config={"model_type": "x"}, max_shard_size=1024)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = checkpoint_mod.safe_open

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "safe_open", counting)
    return calls


def test_reads_every_tensor_exactly(sharded: Path) -> None:
    expected = _tensors()
    with Checkpoint(sharded) as ckpt:
        assert len(ckpt.files) > 1  # really sharded
        assert sorted(ckpt) == sorted(expected)
        got = ckpt.read()
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    assert list(ckpt.read(["model.norm.weight", "model.a.scales"])) == ["model.norm.weight", "model.a.scales"]


def test_each_shard_opened_once_over_many_reads(sharded: Path, opens: list[str]) -> None:
    with Checkpoint(sharded) as ckpt:
        for name in list(ckpt) * 3:
            ckpt.read([name])
        for module in ("model.a", "model.b", "model.norm"):
            ckpt.module_tensors(module)
        n_files = len(ckpt.files)
    assert len(opens) == n_files and len(set(opens)) == n_files


def test_unindexed_directory_opens_each_file_once(tmp_path: Path, opens: list[str]) -> None:
    """A directory of bare shards (no index json): listing the keys opens each file, and reading reuses it."""
    from safetensors.torch import save_file

    d = tmp_path / "bare"
    d.mkdir()
    save_file({"x.weight": torch.ones(2)}, str(d / "part-1.safetensors"))
    save_file({"y.weight": torch.zeros(3)}, str(d / "part-2.safetensors"))
    with Checkpoint(d) as ckpt:
        assert torch.equal(ckpt.read(["y.weight"])["y.weight"], torch.zeros(3))
        assert torch.equal(ckpt.read(["x.weight"])["x.weight"], torch.ones(2))
    assert sorted(opens) == ["part-1.safetensors", "part-2.safetensors"]


def test_module_tensors_and_keys_of(sharded: Path) -> None:
    expected = _tensors()
    with Checkpoint(sharded) as ckpt:
        assert ckpt.keys_of("model.a") == ["model.a.bias", "model.a.qweight", "model.a.scales"]
        assert ckpt.keys_of("model") == []  # only direct children
        got = ckpt.module_tensors("model.a")
    assert sorted(got) == ["bias", "qweight", "scales"]
    assert all(torch.equal(got[leaf], expected[f"model.a.{leaf}"]) for leaf in got)


def test_missing_tensor_names_the_checkpoint(sharded: Path) -> None:
    with Checkpoint(sharded) as ckpt, pytest.raises(MissingTensorError, match="model.c.weight") as info:
        ckpt.read(["model.a.scales", "model.c.weight"])
    assert isinstance(info.value, KeyError) and str(sharded) in str(info.value)


def test_index_naming_a_missing_shard_is_refused(sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (sharded / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        Checkpoint(sharded)


def test_truncated_shard_names_file(sharded: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sharded / index["weight_map"]["model.b.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with Checkpoint(sharded) as ckpt:
        ckpt.read(["model.a.scales"] if index["weight_map"]["model.a.scales"] != shard.name else [])
        with pytest.raises(CheckpointError, match=shard.name):
            ckpt.read(["model.b.weight"])


def test_function_forms_match_the_object(sharded: Path) -> None:
    with Checkpoint(sharded) as ckpt:
        assert read_checkpoint_index(sharded) == ckpt.index
        direct = ckpt.read(["model.b.weight"])["model.b.weight"]
    assert torch.equal(load_tensors(sharded, ["model.b.weight"])["model.b.weight"], direct)
