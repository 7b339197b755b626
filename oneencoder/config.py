"""Stage files: TOML that says what a stage trains, on which data, and how.

Every section maps onto a dataclass; an unknown key is an error that names it,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .curriculum.weights import WEIGHTINGS
from .errors import ConfigError
from .model import AdapterConfig, ProjectionConfig
from .registry import import_plugins, same_kind

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
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
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
    pair = stage["modalities"]
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)):
        raise ConfigError(f"{source}: [stage] modalities must list two modality names, got {pair!r}")
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
    _check_values(config, source)
    return config


def _check_values(config: StageConfig, source: str) -> None:
    """Values the dataclasses accept by type but the code cannot run with."""
    checks = [
        (config.model.pool in ("mean", "token"), f"[model] pool = {config.model.pool!r}: use 'mean' or 'token'"),
        (config.model.d_model > 0 and config.model.heads > 0 and config.model.d_model % config.model.heads == 0,
         f"[model] d_model = {config.model.d_model} must be a positive multiple of heads = {config.model.heads}"),
        (config.model.layers >= 1, "[model] layers must be at least 1"),
        (0.0 <= config.model.language_prior < 1.0, "[model] language_prior must be in [0, 1)"),
        (0.0 <= config.model.dropout < 1.0 and 0.0 <= config.adapter.dropout < 1.0, "dropout must be in [0, 1)"),
        (config.adapter.hidden >= 0, "[adapter] hidden must be >= 0 (0 = linear adapter)"),
        (config.loss.name in ("infonce", "hnnce", "margin"),
         f"[loss] name = {config.loss.name!r}: use 'infonce', 'hnnce' or 'margin'"),
        (0.0 <= config.curriculum.hard_negatives <= 1.0 and 0.0 <= config.curriculum.hn_start <= 1.0,
         "[curriculum] hard_negatives and hn_start must be in [0, 1]"),
        (config.curriculum.hn_source in ("frozen", "model"), "[curriculum] hn_source must be 'frozen' or 'model'"),
        (config.curriculum.weighting in WEIGHTINGS,
         f"[curriculum] weighting = {config.curriculum.weighting!r}: use one of {', '.join(WEIGHTINGS)}"),
        (config.curriculum.superloss_lambda > 0, "[curriculum] superloss_lambda must be > 0"),
        (0.0 <= config.curriculum.weight_floor < 1.0, "[curriculum] weight_floor must be in [0, 1)"),
        (0.0 <= config.curriculum.trust_threshold < 1.0, "[curriculum] trust_threshold must be in [0, 1)"),
        (0.0 <= config.curriculum.group_balance <= 1.0, "[curriculum] group_balance must be in [0, 1]"),
        (all(isinstance(w, (int, float)) and w >= 0 for w in config.curriculum.scorers.values()),
         "[curriculum] scorers must map scorer names to non-negative weights"),
        (config.loss.init_temperature > 0, "[loss] init_temperature must be > 0"),
        (config.train.epochs >= 1, "[train] epochs must be >= 1"),
        (config.train.batch_size >= 2, "[train] batch_size must be >= 2 (contrastive loss needs negatives)"),
        (config.train.lr > 0, "[train] lr must be > 0"),
        (config.train.patience >= 1, "[train] patience must be >= 1"),
        (config.train.log_every >= 1 and config.train.eval_batch_size >= 1, "[train] log_every/eval_batch_size must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
