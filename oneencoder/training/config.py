"""Stage files: TOML that says what a stage trains, on which data, and how.

Every section maps onto a dataclass whose fields declare their options (type, default,
range, choices: :mod:`oneencoder.options`); an unknown key or a value out of bounds is an
error that names it, so a typo never silently falls back to a default, and a NaN learning
rate or a negative warmup never trains garbage.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..features.bank import BANK_KINDS
from ..fileio import MAX_JSON_DEPTH, json_too_deep, not_utf8
from ..model.losses import LOSSES
from ..model.parts import AdapterConfig, ProjectionConfig, adapter_from_dict, projection_from_dict
from ..names import safe_name
from ..options import AT_LEAST_1, NON_NEGATIVE, OPEN_SHARE, POSITIVE, SHARE, Option, Range, option, parse_section
from ..registry import import_plugins
from .curriculum.pacers import PACERS
from .curriculum.weights import WEIGHTING_REGISTRY
from .report import REPORTERS


@dataclass
class DataConfig:
    manifest: str = "outputs/demo/manifest.jsonl"
    cache_dir: str = "outputs/demo/cache"
    # Augmented views per training sample (1: the plain features only); training draws one
    # per sample per epoch, evaluation reads view 0. Built by `cache build` (--views).
    views: int = option(1, range=Range(1, True, 64, True))
    view_seed: int = option(0, range=Range(0, True, 2**32, False))
    view_modalities: list[str] = option([])  # which trainable modalities read views (empty: all that offer them)


@dataclass
class LossConfig:
    # Any registered loss, a plugin's included (the built-ins: oneencoder/model/losses.py).
    name: str = option("infonce", choices=LOSSES.names)
    init_temperature: float = option(0.07, range=POSITIVE)
    # Upper bounds where larger values overflow float32 logits: CLIP clamps the scale at 100;
    # HN-NCE's exp(beta * logit) puts all weight on one negative long before beta = 100; a
    # margin on cosines in [-1, 1] above 2 can never be met.
    max_logit_scale: float = option(100.0, range=Range(0, False, 1e4, True))
    learn_temperature: bool = True
    beta: float = option(0.0, range=Range(0, True, 100, True))  # hnnce: weight of hard negatives (0 = InfoNCE)
    # margin: margin of the hardest pair, scaled by its difficulty (0 = InfoNCE)
    max_margin: float = option(0.0, range=Range(0, True, 2, True))
    # sigmoid: starting logit bias (SigLIP starts at -10 so the many negatives do not swamp the start)
    init_bias: float = option(-10.0, range=Range(-100, True, 100, True))


@dataclass
class TrainConfig:
    epochs: int = option(40, range=AT_LEAST_1)
    batch_size: int = option(128, range=Range(2, True))  # negatives need a second pair
    lr: float = option(1e-3, range=Range(0, False, 1, True))
    weight_decay: float = option(0.05, range=NON_NEGATIVE)
    warmup_steps: int = option(50, range=NON_NEGATIVE)
    min_lr_ratio: float = option(0.05, range=SHARE)
    grad_clip: float = option(1.0, range=NON_NEGATIVE)  # 0 = no clipping
    patience: int = option(10, range=AT_LEAST_1)
    seed: int = option(0, range=Range(0, True, 2**32, False))  # numpy's seed range
    device: str = "auto"
    log_every: int = option(10, range=AT_LEAST_1)
    eval_batch_size: int = option(256, range=AT_LEAST_1)
    # feature banks: auto | memory | disk (memory map beside the cache), see oneencoder/features/bank.py
    bank: str = option("auto", choices=BANK_KINDS)
    # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    precision: str = option("auto", choices=("auto", "fp32", "bf16"))
    compile: bool = False  # torch.compile the model (worth it on GPUs for long runs)
    # Where logs go besides metrics.jsonl (always written): "tensorboard" adds <run>/tensorboard/
    report_to: list[str] = option(["jsonl"])

    def check(self, where: str) -> None:
        """What two options need together, and the names a list option may hold, beyond each one's own range."""
        if self.lr * self.weight_decay >= 1:  # AdamW scales each weight by 1 - lr * weight_decay per step
            raise ConfigError(f"{where} lr * weight_decay must be < 1 (AdamW scales weights by "
                              f"1 - lr * weight_decay each step), got {self.lr} * {self.weight_decay}")
        if not all(isinstance(n, str) and n in REPORTERS for n in self.report_to):
            raise ConfigError(f"{where} report_to must list names of {', '.join(map(repr, REPORTERS))}, "
                              f"got {self.report_to!r}")


@dataclass
class CurriculumConfig:
    """Which pairs and negatives each step sees (see docs/curriculum.md)."""

    # Any registered pacer, a plugin's included (the built-ins: docs/curriculum.md)
    pacer: str = option("random", choices=PACERS.names)
    pacer_options: dict = field(default_factory=dict)  # e.g. {start = 0.25, full_at = 0.8}
    scorers: dict = field(default_factory=lambda: {"text_nouns": 1.0})  # scorer -> weight (rank average)
    hard_negatives: float = option(0.0, range=SHARE)  # final share of a batch filled with mined near neighbours
    hn_start: float = option(0.0, range=SHARE)  # share at the start of training
    hn_k: int = option(10, range=AT_LEAST_1)  # neighbours mined per sample
    # frozen: backbone features; model: current embeddings, refreshed each epoch
    hn_source: str = option("frozen", choices=("frozen", "model"))
    loss_predictor: bool = True  # self_paced: a small net predicts the loss of samples not seen recently
    # Per-pair loss weights for noisy data: none | trust (pair_agreement's clean probability)
    # | superloss (self-paced confidence from the current loss) | trust+superloss
    weighting: str = option("none", choices=WEIGHTING_REGISTRY.names)
    # superloss: how sharply a loss above the batch mean is down-weighted
    superloss_lambda: float = option(1.0, range=POSITIVE)
    weight_floor: float = option(0.0, range=OPEN_SHARE)  # no pair's weight falls below this
    # trust: 0 = weight by clean probability; > 0 = 1 at or above it, else weight_floor
    trust_threshold: float = option(0.0, range=OPEN_SHARE)
    # weight a pair whose caption g training pairs share by g^-group_balance (0 = off)
    group_balance: float = option(0.0, range=SHARE)

    def check(self, where: str) -> None:
        """Scorer weights: the table's values, which no field declaration reaches."""
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                   for w in self.scorers.values()):
            raise ConfigError(f"{where} scorers must map scorer names to non-negative weights, got {self.scorers!r}")


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
    # ``[adapter.<modality>]`` tables: that modality's adapter (the ``[adapter]`` values, overridden)
    modality_adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    plugins: list[str] = field(default_factory=list)
    source: str = ""

    def adapter_for(self, name: str) -> AdapterConfig:
        """The adapter shape of modality ``name``: its ``[adapter.<name>]`` table, else ``[adapter]``."""
        return self.modality_adapters.get(name, self.adapter)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.modality_adapters:  # runs made before per-modality adapters keep their settings
            del d["modality_adapters"]
        d["modalities"] = list(self.modalities)
        return d


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
    adapter_raw = raw.get("adapter", {})
    if not isinstance(adapter_raw, dict):
        raise ConfigError(f"{source}: [adapter] must be a table")
    per_modality = {k: v for k, v in adapter_raw.items() if k in pair and isinstance(v, dict)}
    shared = {k: v for k, v in adapter_raw.items() if k not in per_modality}
    config = StageConfig(
        name=stage["name"],
        modalities=(pair[0], pair[1]),
        trainable=list(trainable),
        data=parse_section(DataConfig, raw.get("data", {}), f"{source}: [data]"),
        modality_options={k: dict(v) for k, v in options.items()},
        model=projection_from_dict(raw.get("model", {}), f"{source}: [model]"),
        adapter=adapter_from_dict(shared, f"{source}: [adapter]"),
        modality_adapters={n: adapter_from_dict({**shared, **table}, f"{source}: [adapter.{n}]")
                           for n, table in per_modality.items()},
        loss=parse_section(LossConfig, raw.get("loss", {}), f"{source}: [loss]"),
        train=parse_section(TrainConfig, raw.get("train", {}), f"{source}: [train]"),
        curriculum=parse_section(CurriculumConfig, raw.get("curriculum", {}), f"{source}: [curriculum]"),
        plugins=list(plugins),
        source=source,
    )
    config.train.check(f"{source}: [train]")
    config.curriculum.check(f"{source}: [curriculum]")
    # Modality options are checked by their modality when it is created; a number that is not
    # finite is refused here already, naming the file (an option of any type: Option(None)).
    for name, table in config.modality_options.items():
        for key, value in table.items():
            Option(None).check(f"{source}: [modalities.{name}]", key, value)
    return config
