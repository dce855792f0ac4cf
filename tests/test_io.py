"""Atomic checkpoint writing: sharding + index, atomic replacement, the verify hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmquant.checkpoint import load_tensors, read_checkpoint_index, read_config
from llmquant.io import write_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "a": torch.randn(16, 16),  # 1024 bytes
        "b": torch.arange(10, dtype=torch.int32),
        "c": torch.randn(64, 64).half(),  # 8192 bytes: larger than the shard limit below
        "d": torch.randn(3, 5).t(),  # not contiguous
        "e": torch.tensor([True, False]),
    }


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def test_single_file_checkpoint(tmp_path: Path) -> None:
    tensors = _tensors()
    out = write_checkpoint(
        tmp_path / "ckpt",
        tensors,
        config={"model_type": "llama"},
        extra_files={"quantize_config.json": {"bits": 4}},
        metadata={"who": "test"},
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "quantize_config.json",
    ]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "who": "test"}
    index = read_checkpoint_index(out)
    assert set(index) == set(tensors) and set(index.values()) == {out / "model.safetensors"}
    loaded = load_tensors(out, ["d", "b"])
    assert list(loaded) == ["d", "b"] and torch.equal(loaded["d"], tensors["d"])
    assert all(torch.equal(v, tensors[k]) for k, v in load_tensors(out).items())
    assert read_config(out) == {"model_type": "llama"}
    assert json.loads((out / "quantize_config.json").read_text()) == {"bits": 4}
    with pytest.raises(KeyError, match="zzz"):
        load_tensors(out, ["zzz"])
    assert _siblings(out) == ["ckpt"]


def test_sharded_checkpoint_index(tmp_path: Path) -> None:
    tensors = _tensors()
    out = write_checkpoint(tmp_path / "ckpt", tensors, config={}, max_shard_size=1500)
    index_json = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    assert set(index_json["weight_map"]) == set(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index_json["metadata"]["total_size"] == total
    for shard in shards:  # each shard holds exactly the tensors the index maps to it
        with safe_open(str(out / shard), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index_json["weight_map"].items() if v == shard}
    assert index_json["weight_map"]["c"] not in {index_json["weight_map"][k] for k in "abde"}
    loaded = load_tensors(out)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert read_checkpoint_index(out / "model.safetensors.index.json") == read_checkpoint_index(out)


def test_failing_verify_leaves_nothing(tmp_path: Path) -> None:
    seen: list[Path] = []

    def verify(tmp: Path) -> None:
        seen.append(tmp)
        assert (tmp / "config.json").is_file()
        raise RuntimeError("bad checkpoint")

    with pytest.raises(RuntimeError, match="bad checkpoint"):
        write_checkpoint(tmp_path / "ckpt", _tensors(), config={}, verify=verify)
    assert seen and seen[0].parent == tmp_path and seen[0].name.startswith("ckpt.tmp-")
    assert list(tmp_path.iterdir()) == []


def test_existing_dir_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_checkpoint(out, {"x": torch.ones(2)}, config={"v": 1})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _siblings(out) == ["ckpt"]

    def verify(tmp: Path) -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        write_checkpoint(out, {"x": torch.zeros(2)}, config={"v": 2}, verify=verify)
    assert read_config(out) == {"v": 1} and torch.equal(load_tensors(out)["x"], torch.ones(2))
    assert _siblings(out) == ["ckpt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_replacing_swaps_without_a_gap_or_falls_back(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """With RENAME_EXCHANGE the output path never disappears during the swap (observed from inside the
    swap); without it (other platforms), the two-rename fallback still replaces the directory."""
    from llmquant import io

    out = tmp_path / "ckpt"
    write_checkpoint(out, {"x": torch.ones(2)}, config={"v": 1})
    exchange_ = io._exchange
    seen: list[dict] = []

    def observed(a: Path, b: Path) -> bool:
        done = exchange_(a, b) if exchange else False
        seen.append(read_config(b) if b.exists() else {})
        return done

    monkeypatch.setattr(io, "_exchange", observed)
    write_checkpoint(out, {"x": torch.zeros(2)}, config={"v": 2})
    assert seen == ([{"v": 2}] if exchange else [{"v": 1}])  # exchanged in one step / not yet moved
    assert read_config(out) == {"v": 2} and torch.equal(load_tensors(out)["x"], torch.zeros(2))
    assert _siblings(out) == ["ckpt"]


def test_stale_temporary_directories_are_removed_and_a_cut_swap_restored(tmp_path: Path) -> None:
    """What a writer killed outright leaves (``ckpt.tmp-XXXXXXXX``; ``ckpt.old-XXXXXXXX`` with no
    ``ckpt``) is cleaned by the next write or put back; a live writer's locked directory and a
    directory with another name are left alone."""
    import fcntl
    import os

    from llmquant.io import remove_stale_writes

    out = tmp_path / "ckpt"
    for name in ("ckpt.tmp-dead0001", "ckpt.tmp-live0001", "ckpt.tmp-mine", "ckpt.old-prev0001", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"name": name}))
    live = os.open(tmp_path / "ckpt.tmp-live0001", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(live, fcntl.LOCK_EX)
    try:
        removed = remove_stale_writes(out)
        assert [p.name for p in removed] == ["ckpt.old-prev0001", "ckpt.tmp-dead0001"]
        assert read_config(out) == {"name": "ckpt.old-prev0001"}  # the cut-short swap's previous output
        assert _siblings(out) == ["ckpt", "ckpt.tmp-live0001", "ckpt.tmp-mine", "other"]
    finally:
        os.close(live)
    (tmp_path / "ckpt.tmp-dead0002").mkdir()
    write_checkpoint(out, {"x": torch.ones(2)}, config={"v": 3})
    assert read_config(out) == {"v": 3}
    assert _siblings(out) == ["ckpt", "ckpt.tmp-mine", "other"]  # the released one went with the dead one


def test_shared_storage_and_bad_names_rejected(tmp_path: Path) -> None:
    a = torch.randn(4, 4)
    with pytest.raises(ValueError, match="share memory"):
        write_checkpoint(tmp_path / "c", {"x": a, "y": a}, config={})
    with pytest.raises(ValueError, match="share memory"):
        write_checkpoint(tmp_path / "c", {"x": a[:2], "y": a[2:]}, config={})
    with pytest.raises(ValueError, match="clashes"):
        write_checkpoint(tmp_path / "c", {"x": a}, config={}, extra_files={"config.json": {}})
    with pytest.raises(ValueError, match="plain file name"):
        write_checkpoint(tmp_path / "c", {"x": a}, config={}, extra_files={"../x.json": {}})
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    out = write_checkpoint(tmp_path / "c", {"x": a}, config={}, copy_files=[src / "tokenizer.json"])
    assert (out / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]
