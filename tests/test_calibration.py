"""Calibration blocks: exact slicing, padding masks, determinism, offline failures, recipes."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from llmquant.calibration import (
    RECIPE_KEYS,
    CalibrationBlocks,
    CalibrationError,
    list_recipes,
    load_calibration,
    load_recipe,
)
from llmquant.config import CalibrationConfig

_WORD_TEXT = (
    "the model quantizes weights into groups while calibration tokens flow through each decoder layer "
    "and the hessian of every linear collects activation statistics before rounding to a small grid"
)
WORDS = _WORD_TEXT.split()
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer([_text(3000, seed=s) for s in range(3)], CHAT_TEMPLATE)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expect_consecutive(blocks: CalibrationBlocks, ids: list[int], n: int, seqlen: int) -> None:
    expected = torch.tensor(ids[: n * seqlen]).view(n, seqlen)
    assert blocks.input_ids.dtype == torch.long and blocks.attention_mask.dtype == torch.long
    assert torch.equal(blocks.input_ids, expected)
    assert torch.equal(blocks.attention_mask, torch.ones(n, seqlen, dtype=torch.long))


def test_txt_concat_is_consecutive_slices_of_whole_text(tokenizer, tmp_path):
    text = _text(2000, seed=7)
    path = tmp_path / "corpus.utf8"
    path.write_text(text, encoding="utf-8")
    ids = _ids(tokenizer, text)
    assert len(ids) > 6 * 64
    cfg = CalibrationConfig(source=str(path), n_samples=6, seqlen=64)
    blocks = load_calibration(cfg, tokenizer)
    _expect_consecutive(blocks, ids, 6, 64)
    assert blocks.source == str(path)
    assert len(blocks.fingerprint) == 64
    assert load_calibration(cfg, tokenizer).fingerprint == blocks.fingerprint
    # Same tokens, other block shape: the fingerprint must change.
    other = load_calibration(CalibrationConfig(source=str(path), n_samples=12, seqlen=32), tokenizer)
    assert torch.equal(other.input_ids.flatten(), blocks.input_ids.flatten())
    assert other.fingerprint != blocks.fingerprint


def test_seed_does_not_change_local_text_blocks(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(_text(1000), encoding="utf-8")
    a = load_calibration(CalibrationConfig(source=str(path), n_samples=3, seqlen=32, seed=0), tokenizer)
    b = load_calibration(CalibrationConfig(source=str(path), n_samples=3, seqlen=32, seed=5), tokenizer)
    assert a.fingerprint == b.fingerprint


def test_too_short_text_names_available_tokens(tokenizer, tmp_path):
    text = _text(240)
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    n_tokens = len(_ids(tokenizer, text))
    with pytest.raises(CalibrationError) as info:
        load_calibration(CalibrationConfig(source=str(path), n_samples=200, seqlen=64), tokenizer)
    message = str(info.value)
    assert f"{n_tokens:,} tokens" in message
    assert f"{n_tokens // 64} blocks of 64" in message
    assert "--n-samples" in message and "--seqlen" in message


def test_jsonl_custom_text_field_concat(tokenizer, tmp_path):
    docs = [_text(60, seed=s) for s in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)), "utf-8")
    blocks = load_calibration(
        CalibrationConfig(source=str(path), n_samples=5, seqlen=48, text_field="body"), tokenizer
    )
    _expect_consecutive(blocks, _ids(tokenizer, "\n\n".join(docs)), 5, 48)


def test_jsonl_missing_field_is_a_clear_error(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n", "utf-8")
    with pytest.raises(CalibrationError, match="no column 'text'"):
        load_calibration(CalibrationConfig(source=str(path), n_samples=1, seqlen=8), tokenizer)


def test_parquet_text_column(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [_text(60, seed=s) for s in range(30)]
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), path)
    blocks = load_calibration(CalibrationConfig(source=str(path), n_samples=4, seqlen=40), tokenizer)
    _expect_consecutive(blocks, _ids(tokenizer, "\n\n".join(docs)), 4, 40)


def _write_chats(path, n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(1)
    chats = []
    for i in range(n):
        user = _text(12 + 12 * rng.randrange(1, 8), seed=100 + i)
        chats.append([{"role": "user", "content": user}, {"role": "assistant", "content": f"ok {i}"}])
    path.write_text("\n".join(json.dumps({"messages": c}) for c in chats), "utf-8")
    return chats


def test_jsonl_messages_per_sample_pads_and_masks(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    chats = _write_chats(path, 20)
    seqlen = 64
    encoded = [_ids(tokenizer, tokenizer.apply_chat_template(c, tokenize=False))[:seqlen] for c in chats]
    assert any(len(e) < seqlen for e in encoded) and any(len(e) == seqlen for e in encoded)
    blocks = load_calibration(CalibrationConfig(source=str(path), n_samples=8, seqlen=seqlen), tokenizer)
    assert blocks.input_ids.shape == blocks.attention_mask.shape == (8, seqlen)
    pad = tokenizer.eos_token_id  # no pad token: eos pads
    seen = set()
    for ids, mask in zip(blocks.input_ids.tolist(), blocks.attention_mask.tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (seqlen - length)  # right padding only
        assert ids[length:] == [pad] * (seqlen - length)
        assert ids[:length] in encoded  # exactly one templated conversation, truncated
        seen.add(tuple(ids[:length]))
    assert len(seen) == 8  # distinct documents
    assert (blocks.attention_mask == 0).any() and (blocks.attention_mask.sum(1) == seqlen).any()


def test_per_sample_seed_determinism(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    _write_chats(path, 20)

    def load(seed: int) -> CalibrationBlocks:
        return load_calibration(
            CalibrationConfig(source=str(path), n_samples=6, seqlen=64, seed=seed), tokenizer
        )

    a, b, c = load(0), load(0), load(1)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint


def test_messages_without_chat_template_fails(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    _write_chats(path, 3)
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    plain.chat_template = None
    with pytest.raises(CalibrationError, match="chat_template"):
        load_calibration(CalibrationConfig(source=str(path), n_samples=2, seqlen=16), plain)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def test_synthetic_is_seeded_and_leaves_global_rng_alone(tokenizer, tiny_llama):
    def load(seed: int) -> CalibrationBlocks:
        cfg = CalibrationConfig(source="synthetic", n_samples=3, seqlen=16, seed=seed)
        return load_calibration(cfg, tokenizer, model=tiny_llama)

    state = torch.get_rng_state()
    a = load(0)
    assert torch.equal(torch.get_rng_state(), state)
    b, c = load(0), load(1)
    assert a.input_ids.shape == (3, 16) and a.source == "synthetic"
    assert torch.equal(a.attention_mask, torch.ones(3, 16, dtype=torch.long))
    assert (a.input_ids[:, 0] == tokenizer.bos_token_id).all()
    assert int(a.input_ids.max()) < len(tokenizer)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids)


def test_synthetic_needs_a_model(tokenizer):
    with pytest.raises(CalibrationError, match="model"):
        load_calibration(CalibrationConfig(source="synthetic", n_samples=1, seqlen=8), tokenizer)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("name", ["c4", "wikitext2", "pileval", "ultrachat"])
def test_hub_recipe_offline_fails_fast(tokenizer, monkeypatch, var, name):
    monkeypatch.setenv(var, "1")
    start = time.perf_counter()
    with pytest.raises(CalibrationError) as info:
        load_calibration(CalibrationConfig(source=name, n_samples=2, seqlen=16), tokenizer)
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert "\n" not in message
    assert f"recipe {name!r}" in message and load_recipe(name).path in message
    assert "--calib" in message and "synthetic" in message


def test_unknown_source_lists_recipes(tokenizer, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalibrationError) as info:
        load_calibration(CalibrationConfig(source=str(missing), n_samples=1, seqlen=8), tokenizer)
    message = str(info.value)
    assert all(name in message for name in list_recipes())
    assert "no file exists" in message and "nope.txt" in message


def test_recipes_parse_and_declare_required_keys():
    from importlib import resources

    names = list_recipes()
    assert set(names) >= {"c4", "wikitext2", "pileval", "ultrachat"}
    for name in names:
        raw = json.loads(resources.files("llmquant.recipes").joinpath(f"{name}.json").read_text("utf-8"))
        assert set(raw) == set(RECIPE_KEYS), name
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.mode in ("concat", "per_sample")
        assert recipe.max_documents >= 1000
        assert recipe.chat == (recipe.text_field == "messages")
    assert load_recipe("wikitext2").split == "train"  # never calibrate on the benchmark's test split
    assert load_recipe("ultrachat").mode == "per_sample"
    with pytest.raises(CalibrationError, match="unknown calibration recipe"):
        load_recipe("nope")


def test_recipe_streaming_path_shuffles_with_seed(tokenizer, tmp_path, monkeypatch):
    """The hub recipe code path (streaming, seeded shuffle buffer, concat) on a local json 'hub'."""
    from llmquant import calibration

    docs = [f"Document {i}. " + _text(24, seed=i) for i in range(60)]
    path = tmp_path / "hub.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), "utf-8")
    monkeypatch.setattr(calibration, "_check_hub", lambda recipe: None)

    def load(seed: int, shuffle_buffer: int) -> tuple[torch.Tensor, torch.Tensor]:
        recipe = calibration.Recipe(
            name="local",
            description="",
            path="json",
            config_name=None,
            data_files=str(path),
            split="train",
            text_field="text",
            mode="concat",
            chat=False,
            separator="\n\n",
            shuffle_buffer=shuffle_buffer,
            max_documents=1000,
        )
        return calibration._recipe_blocks(
            recipe, CalibrationConfig(n_samples=4, seqlen=32, seed=seed), tokenizer
        )

    ordered, mask = load(0, 0)
    assert torch.equal(ordered, torch.tensor(_ids(tokenizer, "\n\n".join(docs))[:128]).view(4, 32))
    assert bool(mask.all())
    a, b, c = load(0, 100)[0], load(0, 100)[0], load(1, 100)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, ordered)
