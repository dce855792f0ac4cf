"""Calibration data: recipes, local files or model-sampled text -> fixed-size token blocks.

``load_calibration(config, tokenizer, model=None)`` returns ``CalibrationBlocks`` with
``input_ids``/``attention_mask`` of shape [n_samples, seqlen] and a sha256 ``fingerprint`` over both.

Sources (``CalibrationConfig.source``):

* a recipe name (``list_recipes()``; JSON files in ``calibration/``, installed as ``llmquant.recipes``):
  a hub dataset streamed with ``datasets.load_dataset(..., streaming=True)`` so only what is needed is
  read. Documents are shuffled with the seed through a streaming shuffle buffer (``shuffle_buffer``;
  0 keeps the dataset order, e.g. wikitext2). The hub is probed first with a short timeout and
  ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are honored, so an offline machine fails at once with a
  one-line ``CalibrationError`` pointing at ``--calib PATH`` / ``--calib synthetic``.
* a local file: ``.jsonl``/``.json``/``.parquet`` rows read (streaming) from ``text_field``; a
  ``messages`` column is rendered with the tokenizer's chat template, one conversation per block
  (``per_sample``, rows shuffled with the seed). Any other file is plain UTF-8 text.
* ``synthetic``: text sampled from ``model`` itself (seeded, global RNG untouched).

Modes:

* ``concat``: documents joined with the recipe's separator, tokenized at once without special
  tokens, cut into consecutive non-overlapping blocks from the start: block i = ids[i*seqlen:(i+1)*seqlen].
  Local text files and local jsonl/parquet text columns are NOT shuffled: the blocks are the first
  n_samples*seqlen tokens of the file (the benchmark protocol), so the seed does not affect them.
* ``per_sample``: one document per block, truncated to seqlen, shorter ones padded on the right with
  ``attention_mask`` 0 so padding never enters calibration statistics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from llmquant.config import CalibrationConfig
from llmquant.errors import LlmquantError

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
MODES = ("concat", "per_sample")
RECIPE_KEYS = (
    "name",
    "description",
    "path",
    "config_name",
    "data_files",
    "split",
    "text_field",
    "mode",
    "chat",
    "separator",
    "shuffle_buffer",
    "max_documents",
)
HUB_PROBE_TIMEOUT_S = 10.0
MIN_SAMPLE_TOKENS = 8  # per_sample: shorter documents carry too little signal and are skipped
LOCAL_SHUFFLE_BUFFER = 10_000
SYNTHETIC_TOP_K = 50
SYNTHETIC_BATCH_SIZE = 16
_FINGERPRINT_TAG = b"llmquant-calibration-v1"
_TABULAR_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_CALIB_HINT = "pass a local file with --calib PATH or use --calib synthetic"


class CalibrationError(LlmquantError, ValueError):
    """Calibration data could not be produced; the message says what to change."""


@dataclass(frozen=True, eq=False)
class CalibrationBlocks:
    """Token blocks for calibration.

    input_ids: LongTensor [n, seqlen]; attention_mask: LongTensor [n, seqlen] (1 = real token,
    0 = right padding); source: the configured source; fingerprint: sha256 hex over ids + mask.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    fingerprint: str

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class Recipe:
    """Where documents come from and how they become blocks (one JSON file in ``calibration/``).

    path/config_name/data_files/split: ``datasets.load_dataset`` arguments. text_field: column with
    the text (or the ``messages`` list when ``chat``). mode: ``concat`` or ``per_sample``.
    separator: joins documents in concat mode. shuffle_buffer: streaming shuffle buffer (0 = keep
    order). max_documents: upper bound on documents read.
    """

    name: str
    description: str
    path: str
    config_name: str | None
    data_files: str | list[str] | dict[str, Any] | None
    split: str
    text_field: str
    mode: str
    chat: bool
    separator: str
    shuffle_buffer: int
    max_documents: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CalibrationError(f"recipe {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")
        if self.max_documents < 1 or self.shuffle_buffer < 0:
            raise CalibrationError(f"recipe {self.name!r}: max_documents >= 1 and shuffle_buffer >= 0 needed")


def list_recipes() -> list[str]:
    """Names of the built-in calibration recipes, sorted."""
    root = resources.files("llmquant.recipes")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_recipe(name: str) -> Recipe:
    """Parse and validate the recipe ``name`` (``CalibrationError`` if missing or malformed)."""
    if name not in list_recipes():
        raise CalibrationError(f"unknown calibration recipe {name!r}; known: {', '.join(list_recipes())}")
    data = json.loads(resources.files("llmquant.recipes").joinpath(f"{name}.json").read_text("utf-8"))
    missing = [k for k in RECIPE_KEYS if k not in data]
    extra = sorted(set(data) - set(RECIPE_KEYS))
    if missing or extra:
        raise CalibrationError(f"recipe {name!r}: missing keys {missing}, unknown keys {extra}")
    return Recipe(**data)


def load_calibration(config: CalibrationConfig, tokenizer: Any, model: Any = None) -> CalibrationBlocks:
    """Build ``config.n_samples`` blocks of ``config.seqlen`` tokens from ``config.source``.

    Deterministic for a fixed config (and model, for ``synthetic``). See the module docstring for
    the sources and modes; the seed shuffles recipe documents and per_sample rows and drives
    synthetic sampling, while concat blocks of local files are consecutive from the file start.
    Raises ``CalibrationError`` (a ``ValueError``) with a one-line fix when data cannot be produced.
    """
    source = config.source
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and config.seqlen > context:
        raise CalibrationError(
            f"--seqlen {config.seqlen} is beyond the model's context ({context} tokens); "
            f"use --seqlen {min(context, 2048)} or less"
        )
    if source == SYNTHETIC:
        input_ids, mask = _synthetic_blocks(config, tokenizer, model)
    elif source in list_recipes():
        input_ids, mask = _recipe_blocks(load_recipe(source), config, tokenizer)
    else:
        check_source(config)
        input_ids, mask = _checked_file_blocks(Path(source).expanduser(), config, tokenizer)
    blocks = CalibrationBlocks(input_ids, mask, source, fingerprint(input_ids, mask))
    logger.info(
        "calibration %s: %d x %d tokens (%d real), fingerprint %s",
        source,
        config.n_samples,
        config.seqlen,
        blocks.n_tokens,
        blocks.fingerprint[:12],
    )
    return blocks


def fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """sha256 hex over the shape, token ids and mask (int64 little-endian)."""
    digest = hashlib.sha256(_FINGERPRINT_TAG)
    digest.update(repr(tuple(input_ids.shape)).encode())
    for t in (input_ids, attention_mask):
        digest.update(t.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources


def _recipe_blocks(
    recipe: Recipe, config: CalibrationConfig, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream a hub recipe (after a fast reachability check) into blocks."""
    _check_hub(recipe)
    import datasets

    try:
        ds = datasets.load_dataset(
            recipe.path,
            recipe.config_name,
            data_files=recipe.data_files,
            split=recipe.split,
            streaming=True,
        )
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise CalibrationError(_hub_message(recipe, exc)) from exc
    if recipe.shuffle_buffer > 0:
        ds = ds.shuffle(seed=config.seed, buffer_size=recipe.shuffle_buffer)
    texts = _guard_hub(_iter_texts(ds, recipe.text_field, recipe.chat, tokenizer), recipe)
    texts = itertools.islice(texts, recipe.max_documents)
    return _build_blocks(texts, recipe.mode, recipe.separator, tokenizer, config, recipe.name)


def check_source(config: CalibrationConfig) -> None:
    """The checks on ``config.source`` that need no tokenizer (run before any work): a recipe, synthetic,
    or a readable, non-empty file (``CalibrationError`` naming the path otherwise)."""
    source = config.source
    if source == SYNTHETIC or source in list_recipes():
        return
    path = Path(source).expanduser()
    if path.is_dir():
        raise CalibrationError(
            f"calibration source {path} is a directory; pass a text file (.txt, .jsonl, .json, .parquet), "
            f"a recipe ({', '.join(list_recipes())}) or {SYNTHETIC!r}"
        )
    if not path.is_file():
        raise CalibrationError(
            f"calibration source {source!r} is not a recipe ({', '.join(list_recipes())}), "
            f"not {SYNTHETIC!r}, and no file exists at {path.resolve()}"
        )
    if not os.access(path, os.R_OK):
        raise CalibrationError(f"calibration file {path} is not readable (check its permissions)")
    if path.stat().st_size == 0:
        raise CalibrationError(f"calibration file {path} is empty; pass a file with text in it")


def _checked_file_blocks(
    path: Path, config: CalibrationConfig, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_file_blocks`` with one-line errors that name the file: not UTF-8, unparsable, too short."""
    try:
        return _file_blocks(path, config, tokenizer)
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text ({exc.reason})") from exc
    except CalibrationError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:  # datasets / pyarrow parse errors
        reason = " ".join(str(exc).split())[:200]
        raise CalibrationError(
            f"calibration file {path} cannot be read ({type(exc).__name__}: {reason})"
        ) from exc


def _file_blocks(path: Path, config: CalibrationConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks from a local text, jsonl/json or parquet file."""
    builder = _TABULAR_SUFFIXES.get(path.suffix.lower())
    label = f"calibration file {path}"
    if builder is None:
        text = path.read_text(encoding="utf-8")
        ids = _tokenize(tokenizer, text, add_special_tokens=False)
        return _cut_blocks(ids, config.n_samples, config.seqlen, label)
    import datasets

    ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    first = next(iter(ds), None)
    if first is None:
        raise CalibrationError(f"{label} has no rows")
    field = config.text_field
    if field not in first and "messages" in first:
        field = "messages"
    if field not in first:
        raise CalibrationError(
            f"{label} has no column {field!r} (columns: {', '.join(first)}); set text_field / --text-field"
        )
    chat = field == "messages" or isinstance(first[field], list)
    if chat:
        ds = ds.shuffle(seed=config.seed, buffer_size=LOCAL_SHUFFLE_BUFFER)
    mode = "per_sample" if chat else "concat"
    return _build_blocks(_iter_texts(ds, field, chat, tokenizer), mode, "\n\n", tokenizer, config, label)


def _synthetic_blocks(
    config: CalibrationConfig, tokenizer: Any, model: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample n_samples sequences of seqlen tokens from ``model`` (top-k, temperature 1).

    Each sample starts from the BOS token (a seeded random vocabulary token if there is none); EOS is
    suppressed so every block is full. The global RNG state is restored afterwards.
    """
    if model is None:
        raise CalibrationError("calibration source 'synthetic' samples text from the model; pass model=")
    from tqdm.auto import tqdm

    n, seqlen = config.n_samples, config.seqlen
    vocab = model.get_output_embeddings().weight.shape[0]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    pad = _pad_id(tokenizer)
    device = model.device
    batches = range(0, n, SYNTHETIC_BATCH_SIZE)
    rows: list[torch.Tensor] = []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        starts = torch.randint(vocab, (n, 1), generator=gen) if bos is None else torch.full((n, 1), bos)
        for lo in tqdm(batches, desc="synthetic calibration", unit="batch", disable=len(batches) < 2):
            prompt = starts[lo : lo + SYNTHETIC_BATCH_SIZE].to(device)  # [b, 1]
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_k=SYNTHETIC_TOP_K,
                top_p=1.0,
                temperature=1.0,
                repetition_penalty=1.0,
                num_beams=1,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
                pad_token_id=pad,
            )
            rows.append(out[:, :seqlen].cpu())  # [b, seqlen]
    input_ids = torch.cat(rows).long()
    return input_ids, torch.ones_like(input_ids)


# ---------------------------------------------------------------------------------------------
# Hub access


def _check_hub(recipe: Recipe) -> None:
    """Fail fast (one line) when the hub cannot serve ``recipe``: offline env flags or a timed probe."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            raise CalibrationError(_hub_message(recipe, f"{var} is set"))
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(recipe.path, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # network, auth, missing repo: all mean "not usable from here"
        raise CalibrationError(_hub_message(recipe, exc)) from exc


def _hub_message(recipe: Recipe, cause: object) -> str:
    reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
    reason = " ".join(str(reason).split())[:200]
    return (
        f"calibration recipe {recipe.name!r} needs the dataset {recipe.path} from the hub, which could "
        f"not be reached ({reason}); {_CALIB_HINT}"
    )


def _guard_hub(texts: Iterable[str], recipe: Recipe) -> Iterator[str]:
    """Re-raise network failures during streaming as a one-line ``CalibrationError``."""
    try:
        yield from texts
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise CalibrationError(_hub_message(recipe, exc)) from exc


# ---------------------------------------------------------------------------------------------
# Documents -> blocks


def _iter_texts(rows: Iterable[dict[str, Any]], field: str, chat: bool, tokenizer: Any) -> Iterator[str]:
    """Yield each row's text (chat rows rendered with the tokenizer's chat template)."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"rows hold chat {field!r} but the tokenizer has no chat_template")
    for row in rows:
        if field not in row:
            raise CalibrationError(f"row has no field {field!r} (fields: {', '.join(row)})")
        value = row[field]
        if chat:
            yield tokenizer.apply_chat_template(value, tokenize=False)
        elif isinstance(value, str):
            yield value


def _build_blocks(
    texts: Iterable[str], mode: str, separator: str, tokenizer: Any, config: CalibrationConfig, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == "per_sample":
        return _per_sample_blocks(texts, tokenizer, config.n_samples, config.seqlen, label)
    ids = _tokenize(tokenizer, _join_enough(texts, separator, tokenizer, config), add_special_tokens=False)
    return _cut_blocks(ids, config.n_samples, config.seqlen, label)


def _join_enough(texts: Iterable[str], separator: str, tokenizer: Any, config: CalibrationConfig) -> str:
    """Join documents until they hold comfortably more than n_samples*seqlen tokens (or run out)."""
    target = config.n_samples * config.seqlen * 1.02 + config.seqlen  # margin: joint != summed counts
    parts: list[str] = []
    count = 0
    for text in texts:
        parts.append(text)
        count += len(_tokenize(tokenizer, text + separator, add_special_tokens=False))
        if count >= target:
            break
    return separator.join(parts)


def _cut_blocks(ids: list[int], n: int, seqlen: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping blocks ids[i*seqlen:(i+1)*seqlen], i < n."""
    available = len(ids) // seqlen
    if available < n:
        raise CalibrationError(
            f"{label} has {len(ids):,} tokens = {available:,} blocks of {seqlen}; asked for {n} "
            "— lower --n-samples or --seqlen"
        )
    input_ids = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)  # [n*seqlen] -> [n, seqlen]
    return input_ids, torch.ones_like(input_ids)


def _per_sample_blocks(
    texts: Iterable[str], tokenizer: Any, n: int, seqlen: int, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One document per block: truncate to seqlen, right-pad with attention_mask 0."""
    pad = _pad_id(tokenizer)
    input_ids = torch.full((n, seqlen), pad, dtype=torch.long)
    mask = torch.zeros((n, seqlen), dtype=torch.long)
    filled = 0
    for text in texts:
        ids = _tokenize(tokenizer, text, add_special_tokens=False)[:seqlen]
        if len(ids) < MIN_SAMPLE_TOKENS:
            continue
        input_ids[filled, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[filled, : len(ids)] = 1
        filled += 1
        if filled == n:
            return input_ids, mask
    raise CalibrationError(
        f"{label} has only {filled} usable documents (>= {MIN_SAMPLE_TOKENS} tokens); asked for {n} "
        "— lower --n-samples"
    )


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0
