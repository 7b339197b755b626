"""Stage files: TOML that says what a stage trains, on which data, and how.

Every section maps onto a dataclass; an unknown key is an error that names it,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError
from ..fileio import MAX_JSON_DEPTH, json_too_deep, not_utf8
from ..model.parts import AdapterConfig, ProjectionConfig
from ..names import safe_name
from ..registry import import_plugins, same_kind
from .curriculum.weights import WEIGHTINGS

T = TypeVar("T")


@dataclass
class DataConfig:
    manifest: str = "outputs/demo/manifest.jsonl"
    cache_dir: str = "outputs/demo/cache"


@dataclass
class LossConfig:
    name: str = "infonce"  # infonce | hnnce | margin
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    beta: float = 0.0  # hnnce: weight of hard negatives (0 = InfoNCE)
    max_margin: float = 0.0  # margin: margin of the hardest pair, scaled by its difficulty (0 = InfoNCE)


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_batch_size: int = 256
    bank: str = "auto"  # feature banks: auto | memory | disk (memory map beside the cache), see oneencoder/features/bank.py
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False  # torch.compile the model (worth it on GPUs for long runs)


@dataclass
class CurriculumConfig:
    """Which pairs and negatives each step sees (see docs/curriculum.md)."""

    pacer: str = "random"  # random | anti | phases | linear | root | geometric | windows | self_paced
    pacer_options: dict = field(default_factory=dict)  # e.g. {start = 0.25, full_at = 0.8}
    scorers: dict = field(default_factory=lambda: {"text_nouns": 1.0})  # scorer -> weight (rank average)
    hard_negatives: float = 0.0  # final share of a batch filled with mined near neighbours
    hn_start: float = 0.0  # share at the start of training
    hn_k: int = 10  # neighbours mined per sample
    hn_source: str = "frozen"  # frozen: backbone features; model: current embeddings, refreshed each epoch
    loss_predictor: bool = True  # self_paced: a small net predicts the loss of samples not seen recently
    # Per-pair loss weights for noisy data: none | trust (pair_agreement's clean probability)
    # | superloss (self-paced confidence from the current loss) | trust+superloss
    weighting: str = "none"
    superloss_lambda: float = 1.0  # superloss: how sharply a loss above the batch mean is down-weighted
    weight_floor: float = 0.0  # no pair's weight falls below this
    trust_threshold: float = 0.0  # trust: 0 = weight by clean probability; > 0 = 1 at or above it, else weight_floor
    group_balance: float = 0.0  # weight a pair whose caption g training pairs share by g^-group_balance (0 = off)


@dataclass
class StageConfig:
    """One stage. ``modalities`` is the aligned pair; ``trainable`` lists what learns."""

    name: str
    modalities: tuple[str, str]
    trainable: list[str]
    data: DataConfig = field(default_factory=DataConfig)
    modality_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: ProjectionConfig = field(default_factory=ProjectionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    plugins: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modalities"] = list(self.modalities)
        return d


def _section(cls: type[T], raw: Any, where: str) -> T:
    """``cls`` from a table: an unknown name or a value of another type than the default is an error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
    defaults = cls()  # every section dataclass has defaults
    for key, value in raw.items():
        if not same_kind(getattr(defaults, key), value):
            raise ConfigError(f"{where}.{key} = {value!r}: expected {type(getattr(defaults, key)).__name__}")
    return cls(**raw)


def resolve_stage_path(stage: str | Path) -> Path:
    """A path to a TOML file, or the name of a stage shipped with oneencoder (e.g. ``image_text``)."""
    path = Path(stage)
    if path.is_file():
        return path
    packaged = resources.files("oneencoder.stages") / f"{Path(stage).stem}.toml"
    if packaged.is_file():
        return Path(str(packaged))
    shipped = sorted(p.name[:-5] for p in resources.files("oneencoder.stages").iterdir() if p.name.endswith(".toml"))
    raise ConfigError(f"stage file not found: {stage} (shipped stages: {', '.join(shipped)})")


def load_stage(stage: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> StageConfig:
    """Parse a stage file; ``overrides`` (section -> key -> value) win over the file."""
    path = resolve_stage_path(stage)
    try:
        text = path.read_text(encoding="utf-8")
        deep = json_too_deep(text)  # TOML's arrays and inline tables nest like JSON's; the parser recurses
        if deep is not None:
            raise ConfigError(f"{path}:{deep}: TOML nested deeper than {MAX_JSON_DEPTH} levels (the limit)")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(str(path), e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return parse_stage(raw, str(path))


def parse_stage(raw: dict[str, Any], source: str = "<dict>") -> StageConfig:
    known = {"stage", "data", "modalities", "model", "adapter", "loss", "train", "curriculum"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(known)}")
    stage = dict(raw.get("stage", {}))
    for key in ("name", "modalities", "trainable"):
        if key not in stage:
            raise ConfigError(f"{source}: [stage] needs '{key}'")
    # The name becomes ``<model>/runs/<name>`` (removed on --overwrite) and each modality name a
    # cache folder and an adapter file: checked before anything is read or written.
    safe_name(stage["name"], f"{source}: [stage] name")
    pair = stage["modalities"]
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)):
        raise ConfigError(f"{source}: [stage] modalities must list two modality names, got {pair!r}")
    for m in pair:
        safe_name(m, f"{source}: [stage] modalities")
    if pair[0] == pair[1]:
        raise ConfigError(f"{source}: [stage] modalities must name two different modalities, got {pair!r}")
    extra = set(stage) - {"name", "modalities", "trainable", "description", "plugins"}
    if extra:
        raise ConfigError(f"{source}: [stage] unknown option(s) {sorted(extra)}")
    plugins = stage.get("plugins", [])
    if not (isinstance(plugins, list) and all(isinstance(p, str) for p in plugins)):
        raise ConfigError(f"{source}: [stage] plugins must be a list of module names, got {plugins!r}")
    import_plugins(plugins, f"{source}: [stage] plugins")
    trainable = stage["trainable"]
    if not (isinstance(trainable, list) and trainable and all(isinstance(t, str) for t in trainable)):
        raise ConfigError(f"{source}: [stage] trainable must be a list of names, got {trainable!r}")
    for name in trainable:
        if name != "projection" and name not in pair:
            raise ConfigError(f"{source}: [stage] trainable lists {name!r}, which is neither 'projection' "
                              f"nor one of the stage's modalities {pair}")
    options = raw.get("modalities", {})
    for name, table in options.items():
        if name not in pair:
            raise ConfigError(f"{source}: [modalities.{name}] is not one of the stage's modalities {pair}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [modalities.{name}] must be a table")
    config = StageConfig(
        name=stage["name"],
        modalities=(pair[0], pair[1]),
        trainable=list(trainable),
        data=_section(DataConfig, raw.get("data", {}), f"{source} [data]"),
        modality_options={k: dict(v) for k, v in options.items()},
        model=_section(ProjectionConfig, raw.get("model", {}), f"{source} [model]"),
        adapter=_section(AdapterConfig, raw.get("adapter", {}), f"{source} [adapter]"),
        loss=_section(LossConfig, raw.get("loss", {}), f"{source} [loss]"),
        train=_section(TrainConfig, raw.get("train", {}), f"{source} [train]"),
        curriculum=_section(CurriculumConfig, raw.get("curriculum", {}), f"{source} [curriculum]"),
        plugins=list(plugins),
        source=source,
    )
    _check_numbers(config, source)
    _check_values(config, source)
    return config


# The range of every numeric stage option: (lowest, lowest allowed?, highest, highest allowed?).
# None is unbounded. A value outside, or not finite (nan, inf), is an error naming the option:
# a NaN learning rate or a negative warmup would otherwise train garbage, or train silently wrong.
_POSITIVE, _NON_NEGATIVE, _SHARE, _OPEN_SHARE = (0, False, None, False), (0, True, None, False), \
    (0, True, 1, True), (0, True, 1, False)
_AT_LEAST_1 = (1, True, None, False)
NUMERIC_RANGES: dict[str, dict[str, tuple[float | None, bool, float | None, bool]]] = {
    "model": {"d_model": _AT_LEAST_1, "layers": _AT_LEAST_1, "heads": _AT_LEAST_1, "mlp_ratio": _POSITIVE,
              "dropout": _OPEN_SHARE, "language_prior": _OPEN_SHARE, "language_dim": _NON_NEGATIVE},
    "adapter": {"hidden": _NON_NEGATIVE, "dropout": _OPEN_SHARE},  # hidden 0 = linear adapter
    # Upper bounds where larger values overflow float32 logits: CLIP clamps the scale at 100;
    # HN-NCE's exp(beta * logit) puts all weight on one negative long before beta = 100; a
    # margin on cosines in [-1, 1] above 2 can never be met.
    "loss": {"init_temperature": _POSITIVE, "max_logit_scale": (0, False, 1e4, True), "beta": (0, True, 100, True),
             "max_margin": (0, True, 2, True)},
    "train": {"epochs": _AT_LEAST_1, "batch_size": (2, True, None, False),  # negatives need a second pair
              "lr": (0, False, 1, True), "weight_decay": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE,
              "min_lr_ratio": _SHARE, "grad_clip": _NON_NEGATIVE,  # 0 = no clipping
              "patience": _AT_LEAST_1, "seed": (0, True, 2**32, False),  # numpy's seed range
              "log_every": _AT_LEAST_1, "eval_batch_size": _AT_LEAST_1},
    "curriculum": {"hard_negatives": _SHARE, "hn_start": _SHARE, "hn_k": _AT_LEAST_1,
                   "superloss_lambda": _POSITIVE, "weight_floor": _OPEN_SHARE, "trust_threshold": _OPEN_SHARE,
                   "group_balance": _SHARE},
}


def range_words(rule: tuple[float | None, bool, float | None, bool]) -> str:
    """``(0, True, 1, False)`` -> ``"in [0, 1)"``; ``(0, False, None, False)`` -> ``"> 0"``."""
    lo, lo_in, hi, hi_in = rule
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def in_range(value: float, rule: tuple[float | None, bool, float | None, bool]) -> bool:
    lo, lo_in, hi, hi_in = rule
    if not math.isfinite(value):
        return False
    above = lo is None or value > lo or (lo_in and value == lo)
    below = hi is None or value < hi or (hi_in and value == hi)
    return above and below


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds (in lists and tables), a float that is nan or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def check_section(section: str, values: Any, where: str) -> None:
    """Every number of one section (a dataclass) finite, and in its range (``NUMERIC_RANGES[section]``)."""
    rules = NUMERIC_RANGES.get(section, {})
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        rule = rules.get(f.name)
        if rule is not None and not in_range(value, rule):
            raise ConfigError(f"{where} {f.name} must be {range_words(rule)} (a finite number), got {value!r}")
        if _non_finite(value):
            raise ConfigError(f"{where} {f.name} must hold finite numbers, got {value!r}")


def check_projection(model: ProjectionConfig, where: str) -> None:
    """What the projection's shape needs beyond each number's own range."""
    check_section("model", model, where)
    if model.pool not in ("mean", "token"):
        raise ConfigError(f"{where} pool = {model.pool!r}: use 'mean' or 'token'")
    if model.d_model % model.heads:
        raise ConfigError(f"{where} d_model = {model.d_model} must be a positive multiple of heads = {model.heads}")


def projection_from_dict(raw: Any, where: str) -> ProjectionConfig:
    """A recorded projection config (``oneencoder.json``), checked as a stage file's ``[model]``."""
    config = _section(ProjectionConfig, raw, where)
    check_projection(config, where)
    return config


def adapter_from_dict(raw: Any, where: str) -> AdapterConfig:
    """A recorded adapter config (``oneencoder.json``), checked as a stage file's ``[adapter]``."""
    config = _section(AdapterConfig, raw, where)
    check_section("adapter", config, where)
    return config


def _check_numbers(config: StageConfig, source: str) -> None:
    """Every number finite (pacer options and scorer weights included) and in its range."""
    check_projection(config.model, f"{source}: [model]")
    for section in ("adapter", "loss", "train", "curriculum"):
        check_section(section, getattr(config, section), f"{source}: [{section}]")
    if config.train.lr * config.train.weight_decay >= 1:  # AdamW scales each weight by 1 - lr * weight_decay per step
        raise ConfigError(f"{source}: [train] lr * weight_decay must be < 1 (AdamW scales weights by "
                          f"1 - lr * weight_decay each step), got {config.train.lr} * {config.train.weight_decay}")
    for name, options in config.modality_options.items():
        for key, value in options.items():
            if _non_finite(value):
                raise ConfigError(f"{source}: [modalities.{name}] {key} must be finite, got {value!r}")


def _check_values(config: StageConfig, source: str) -> None:
    """Values the dataclasses accept by type but the code cannot run with."""
    checks = [
        (config.loss.name in ("infonce", "hnnce", "margin"),
         f"[loss] name = {config.loss.name!r}: use 'infonce', 'hnnce' or 'margin'"),
        (config.curriculum.hn_source in ("frozen", "model"), "[curriculum] hn_source must be 'frozen' or 'model'"),
        (config.curriculum.weighting in WEIGHTINGS,
         f"[curriculum] weighting = {config.curriculum.weighting!r}: use one of {', '.join(WEIGHTINGS)}"),
        (all(isinstance(w, (int, float)) and w >= 0 for w in config.curriculum.scorers.values()),
         "[curriculum] scorers must map scorer names to non-negative weights"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
