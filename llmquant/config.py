"""Frozen, validated configuration dataclasses.

Every config validates itself in ``__post_init__`` (a ``ValueError`` that says what to change),
round-trips through ``to_dict``/``from_dict``, and carries a ``version`` so serialized configs stay
readable when fields are added later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
GRIDS = ("minmax", "mse", "search")  # how each group's scale/zero are chosen (llmquant.grid.group_qparams)

T = TypeVar("T", bound="_Config")


class _Config:
    """Mixin: dict round trip with nested configs and a schema version."""

    version: ClassVar[int] = 1
    # fields that dicts of an older version may lack: field -> (the version that added the field or
    # changed its default, the value a dict written before it means)
    absent_means: ClassVar[Mapping[str, tuple[int, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Config) else value
        out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        data = dict(data)
        version = data.pop("version", cls.version)
        if "mse_clip" in data and "grid" not in data:  # configs written before ``grid`` replaced it
            data["grid"] = "mse" if data.pop("mse_clip") else "minmax"
        for key, (since, value) in cls.absent_means.items():
            if version < since:
                data.setdefault(key, value)
        if version > cls.version:
            raise ValueError(
                f"{cls.__name__} version {version} is newer than this llmquant understands "
                f"({cls.version}); upgrade llmquant"
            )
        kwargs: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key, value in data.items():
            if key not in names:
                raise ValueError(f"{cls.__name__} has no field {key!r}; known: {sorted(names)}")
            if key == "scheme" and isinstance(value, dict):
                value = QuantScheme.from_dict(value)
            if key == "refine" and isinstance(value, dict):
                value = RefineConfig.from_dict(value)
            if key == "rounder" and isinstance(value, dict):
                value = method_config_from_dict(value)
            kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class QuantScheme(_Config):
    """How one weight matrix is quantized.

    bits: code width (2, 3, 4 or 8).
    group_size: input channels sharing one scale/zero; None = one group per output row (per-channel).
        K need not be a multiple of it: the last group is then shorter ("ragged").
    sym: symmetric grid (zero fixed at 2**(bits-1)) or asymmetric min-max grid (per-group zero).
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        bad_type = isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
        if self.group_size is not None and (bad_type or self.group_size < 1):
            raise ValueError(
                f"group_size must be a positive integer or None (per-channel), got {self.group_size!r}; "
                "use None instead of -1"
            )

    @property
    def maxq(self) -> int:
        """Largest code value."""
        return (1 << self.bits) - 1

    def num_groups(self, in_features: int) -> int:
        """G = ceil(K / group_size); 1 for per-channel."""
        if self.group_size is None:
            return 1
        return -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size


REFINE_LOSSES = ("mse", "relative")


@dataclass(frozen=True)
class RefineConfig(_Config):
    """Learned rounding refinement after the rounder (``llmquant.refine``): per decoder layer, ``steps``
    signed-gradient steps on rounding offsets against the float layer's outputs.

    steps: optimization steps per decoder layer (one cached calibration batch each).
    lr: step size of the offsets (codes units); None = 1 / steps (AutoRound's default), decaying
        linearly to zero.
    seed: seeds the order in which batches are visited.
    loss: ``"mse"`` the squared error of the layer's outputs over real tokens; ``"relative"`` each
        token's squared error divided by its float output's mean square, so that the few tokens with
        massive activations (attention sinks, whose scale the next RMSNorm removes) do not dominate.
    scales: also tune each group's scale (a multiplier within ×0.82..×1.22, same signed steps, folded
        into exact float16 scales at the end; zeros kept), as AutoRound tunes its min/max.
    """

    steps: int = 100
    lr: float | None = None
    seed: int = 0
    loss: str = "mse"
    scales: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"refine steps must be a positive integer, got {self.steps!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not 0 < self.lr <= 1):
            raise ValueError(f"refine lr must be in (0, 1] (codes per step), got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"refine seed must be an integer, got {self.seed!r}")
        if self.loss not in REFINE_LOSSES:
            raise ValueError(f"refine loss must be one of {', '.join(REFINE_LOSSES)}, got {self.loss!r}")
        if not isinstance(self.scales, bool):
            raise ValueError(f"refine scales must be true or false, got {self.scales!r}")


@dataclass(frozen=True)
class RTNConfig(_Config):
    """Round-to-nearest: no calibration data.

    grid: how each group's scale/zero are chosen (``grid.group_qparams``): ``"minmax"`` the plain
        range, ``"mse"`` a shrink of it minimizing the L2.4 rounding error, ``"search"`` the scale (and
        zero) minimizing the squared rounding error over a wider family (``grid.search_qparams``).
    refine: learned rounding after RTN (``RefineConfig``; needs calibration data), or None.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    grid: str = "minmax"
    refine: RefineConfig | None = None
    method: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        _check_grid(self.grid)
        _check_refine(self.refine)


@dataclass(frozen=True)
class GPTQConfig(_Config):
    """GPTQ (Frantar et al. 2022): Hessian-based error-compensating rounding.

    damp: fraction of the mean Hessian diagonal added to the diagonal before the Cholesky
        factorization; raised automatically (and reported) when the factorization fails.
    block_size: lazy-batch width of the column loop (a speed knob; results do not depend on it).
    act_order: quantize columns in decreasing Hessian-diagonal order (writes a g_idx permutation
        unless static_groups). On by default (llm-compressor's default too, "actorder static"): on
        SmolLM2-135M w4 g64 sym, GPTQ in natural column order was WORSE than RTN (wikitext-2 ppl 29.35
        vs 27.22; act_order + static_groups 23.91; 32x512 c4 calibration, 2 windows). In natural order
        the high-diag(H) columns, which carry the attention-sink token (position 0), are quantized
        after receiving the error of earlier columns; GPTQ, weighting that token 1/seqlen, pushes error
        into those directions, and the sink's v_proj output (which every later token attends to) is
        wrecked: relative v error at position 0 in layers 12-20 of 0.6-2.0 vs RTN's 0.06-0.19.
    static_groups: with act_order, fix each group's grid from the unpermuted weight before the loop, so
        g_idx stays trivial (i // group_size) and every loader's fast path applies. None (default):
        follow act_order.
    true_sequential: quantize q/k/v -> o -> gate/up -> down, each group seeing the quantized outputs
        of the earlier ones.
    grid: how each group's scale/zero are chosen, as for RTN, with the Hessian diagonal (the mean
        squared input of each column) weighting the error of ``"mse"`` and ``"search"``. Applies to
        static-group and per-channel grids (fixed before the loop) and to dynamic groups alike.
        Default ``"search"``: on SmolLM2-135M w4 g64 sym (128 x 512 c4 tokens, wikitext-2 12 windows)
        GPTQ scored 24.108 with it against 25.479 with ``"minmax"`` (docs/benchmarks.md), for a few
        seconds more per model.
    error_propagation: α in [0, 1] of error-propagation-aware GPTQ (GPTAQ, Li et al. 2025; QEP, Arai &
        Ichikawa 2025). 0 = plain GPTQ, which minimizes ‖(W − Q)·X‖ on the quantized model's inputs X.
        Above 0 the pipeline also carries the float model's activations X̃ and GPTQ minimizes
        ‖W·X̃ − Q·X‖ (α = 1) by rounding the shifted target W + α·W·(X̃ − X)·Xᵀ·(X·Xᵀ + λI)⁻¹
        (``gptq.propagation_target``); costs a second activation cache, a float copy of each layer and
        about 1.9x plain GPTQ's time. Default 0.5 (QEP's partial correction): on SmolLM2-135M (128 x 512
        c4 tokens, wikitext-2 12 windows) it was the lowest perplexity and KL measured at every scheme
        where it ran (w4 g64 asym 22.072 against α 1's 22.369 and plain GPTQ's 23.186; w3 g64 asym
        29.743 against 34.517 and 32.517; docs/benchmarks.md, "Ablation table"), also on held-out text.
    refine: learned rounding after GPTQ (``RefineConfig``: signed-gradient steps per layer on the
        codes, grids kept), or None.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool | None = None
    true_sequential: bool = True
    grid: str = "search"
    error_propagation: float = 0.5
    refine: RefineConfig | None = None
    method: ClassVar[str] = "gptq"
    version: ClassVar[int] = 2  # 2: error_propagation defaults to 0.5 (a version-1 dict without it: 0)
    absent_means: ClassVar[Mapping[str, tuple[int, Any]]] = {"error_propagation": (2, 0.0)}

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        _check_grid(self.grid)
        _check_refine(self.refine)
        if self.static_groups is None:  # frozen: resolve the default once, so to_dict() stores a bool
            object.__setattr__(self, "static_groups", self.act_order)
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"damp must be in (0, 1) (a fraction of the mean diagonal), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        alpha = self.error_propagation
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"error_propagation must be a number in [0, 1] (GPTAQ's α), got {alpha!r}")
        if self.static_groups and not self.act_order:
            raise ValueError(
                "static_groups only makes sense with act_order; drop --no-act-order or --static-groups"
            )


@dataclass(frozen=True)
class AWQConfig(_Config):
    """AWQ (Lin et al. 2023): activation-aware per-channel scaling (a *transform* of the float layer),
    then a *rounder* quantizes the scaled weights.

    rounder: ``None`` = round-to-nearest (``--method awq``, the paper's method) or a ``GPTQConfig``
        (``--method awq+gptq``: Hessians collected after the scales are folded); same scheme as this.
    n_grid: exponents a = i / n_grid, i < n_grid, tried for the scales (plus the identity s = 1).
    duo_scaling: scale = x_mean**a / w_mean**(1-a) instead of x_mean**a.
    clip: search a per-group clipping range after scaling (None: on with RTN, off with GPTQ, which
        chooses its own grid while compensating the rounding error).
    clip_grid / max_shrink: the clip search tries ranges shrunk by up to ``max_shrink``, in
        ``clip_grid`` steps.
    search_samples: calibration sequences replayed through the attention / MLP block for each scale
        candidate (the activation means, the linear mappings and the clip search always use every
        token). Measured on SmolLM2-135M w4 g64 asym (wikitext-2, 12 windows): 8 -> 23.52 in 482 s,
        16 -> 23.42 in about twice the time (docs/benchmarks.md); 8 is the default.
    """

    scheme: QuantScheme = field(default_factory=lambda: QuantScheme(bits=4, group_size=128, sym=False))
    rounder: RTNConfig | GPTQConfig | None = None
    n_grid: int = 20
    duo_scaling: bool = True
    clip: bool | None = None
    clip_grid: int = 20
    max_shrink: float = 0.5
    search_samples: int = 8

    def __post_init__(self) -> None:
        _check_scheme(self.scheme)
        if self.rounder is not None and not isinstance(self.rounder, (RTNConfig, GPTQConfig)):
            raise ValueError(
                f"AWQ rounder must be RTNConfig or GPTQConfig, got {type(self.rounder).__name__}"
            )
        if self.rounder is not None and self.rounder.scheme != self.scheme:
            raise ValueError("AWQ and its rounder must use the same QuantScheme")
        if self.clip is None:  # frozen: resolve the default once, so to_dict() stores a bool
            object.__setattr__(self, "clip", not isinstance(self.rounder, GPTQConfig))
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be >= 1, got {self.n_grid}")
        if self.clip_grid < 1:
            raise ValueError(f"clip_grid must be >= 1, got {self.clip_grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.search_samples < 1:
            raise ValueError(f"search_samples must be >= 1, got {self.search_samples}")

    @property
    def method(self) -> str:  # type: ignore[override]
        return "awq+gptq" if isinstance(self.rounder, GPTQConfig) else "awq"

    def rounder_config(self) -> RTNConfig | GPTQConfig:
        """The rounder that runs after the transform (RTN on the same scheme by default)."""
        return self.rounder if self.rounder is not None else RTNConfig(scheme=self.scheme)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rounder is not None:
            out["rounder"] = self.rounder.to_dict() | {"method": self.rounder.method}
        return out


@dataclass(frozen=True)
class CalibrationConfig(_Config):
    """Where calibration token blocks come from.

    source: a recipe name (``c4``, ``wikitext2``, ``pileval``, ``ultrachat``), a local file path
        (.txt, .jsonl, .json, .parquet), or ``synthetic`` (text sampled from the model itself).
    n_samples: number of blocks; seqlen: tokens per block; seed: sampling seed.
    text_field: column holding the text for jsonl/parquet files (recipes bring their own).
    """

    source: str = "c4"
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0
    text_field: str = "text"

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("calibration source must not be empty")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {self.seqlen}")


MethodConfig = RTNConfig | GPTQConfig | AWQConfig


def _check_scheme(scheme: QuantScheme) -> None:
    if not isinstance(scheme, QuantScheme):
        raise ValueError(f"scheme must be a QuantScheme, got {type(scheme).__name__}")


def _check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")


def _check_refine(refine: object) -> None:
    if refine is not None and not isinstance(refine, RefineConfig):
        raise ValueError(f"refine must be a RefineConfig or None, got {type(refine).__name__}")


def method_config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Inverse of ``cfg.to_dict() | {"method": cfg.method}``."""
    data = dict(data)
    method = data.pop("method", None)
    classes = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig, "awq+gptq": AWQConfig}
    if method not in classes:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(classes)}")
    config = classes[method].from_dict(data)
    if config.method != method:
        raise ValueError(f"method {method!r} does not match its settings (they describe {config.method!r})")
    return config
