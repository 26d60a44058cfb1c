"""The schema: what an attention block, a backbone, a setting, a sweep, a profile and one trial's run
config are. spec.py turns files into them.

Every key is documented once, in its `Field(description=...)`, which `ablate config` prints beside the
key; invariants that need more than a type are checked in the model validators (a ValueError there
becomes spec.py's one-line SpecError naming file and key).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ablations import paper, rundir
from ablations.yamlio import bool_for_number

STAGES = (2, 3, 4, 5)  # the paper's conv2_x..conv5_x = timm layer1..layer4
POSITIONS = ("standard", "pre", "post", "identity", "3x3")
MAX_SEEDS = 1000  # seeds per setting, from any source (sweep file, --seeds, a study's attrs): the grid
#                   and every status of it are held in memory
ATTENTION_NAMES = ("se", "eca", "cbam", "gc", "ge", "timm")  # ablations/attention.py builds them
PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:Class, a researcher's module
SE_ONLY = ("reduction", "squeeze", "gate", "bias")  # keys only the paper's SE has


def se_only_message(attention: str) -> str:
    return f"an SE-only key; attention {attention!r} takes its options in attention_args"


def _unless(problem: str | None, value: str) -> str:
    """`value`, or the ValueError pydantic reports as this key's problem."""
    if problem:
        raise ValueError(problem)
    return value


class Frozen(BaseModel):
    # No inf/nan: `train.lr=.inf` is not a recipe.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and bool_for_number(field.annotation, v):
            raise ValueError("must be a number, not true/false")
        return v


class SESpec(Frozen):
    """One attention-block configuration. Defaults are the paper's standard SE-ResNet block (Sec. 6).

    `attention` picks the module (ablations/attention.py): the paper's SE, one of timm's, the model's own
    (`timm`) or a researcher's `package.module:Class`. `position` and `stages` apply to every module; the
    SE-only keys (reduction, squeeze, gate, bias) only to SE, the others take `attention_args`.
    """

    attention: str = Field("se", description="se | eca | cbam | gc | ge | timm | package.module:Class")
    attention_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of a non-SE module")
    reduction: int = Field(16, gt=0, description="r: hidden width is exactly C // r (at least 1; r <= C)")
    squeeze: Literal["avg", "max", "none"] = Field(
        "avg", description="global avg / global max pooling; none = NoSqueeze")
    gate: Literal["sigmoid", "tanh", "relu"] = Field(
        "sigmoid", description="final excitation non-linearity (Table 12)")
    position: Literal["standard", "pre", "post", "identity", "3x3"] = Field(
        "standard", description="integration position (Table 14; 3x3 is Table 15's SE_3x3)")
    stages: tuple[Literal[2, 3, 4, 5], ...] = Field(
        STAGES, description='stages holding SE ("all" = 2..5, Table 13)')
    bias: bool = Field(False, description="FC bias; the paper's ablation parameter counts are weights only")

    @field_validator("attention")
    @classmethod
    def _known_attention(cls, v: str) -> str:
        if v not in ATTENTION_NAMES and not PLUGIN.fullmatch(v):
            raise ValueError(f"unknown attention module (known: {', '.join(ATTENTION_NAMES)}, "
                             "or package.module:Class)")
        return v

    @field_validator("attention_args")
    @classmethod
    def _args_for_other_modules(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        attention = info.data.get("attention", "se")
        if v and attention in ("se", "timm"):
            raise ValueError("the paper's SE takes its options as keys of the setting (reduction, squeeze, "
                             "gate, bias)" if attention == "se" else
                             "`attention: timm` keeps the model's own module as timm built it")
        if not all(isinstance(k, str) and k.isidentifier() for k in v):
            raise ValueError(f"keys must be keyword-argument names (got {sorted(map(str, v))})")
        return v

    @field_validator(*SE_ONLY)
    @classmethod
    def _se_only(cls, v: Any, info: ValidationInfo) -> Any:
        attention = info.data.get("attention", "se")
        if attention != "se" and v != cls.model_fields[info.field_name].default:
            raise ValueError(se_only_message(attention))
        return v

    @field_validator("stages", mode="before")
    @classmethod
    def _all_stages(cls, v: Any) -> Any:
        if v == "all":
            return STAGES
        if isinstance(v, int):
            return (v,)
        return v

    @field_validator("stages")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("needs at least one stage (disable SE with `se: false` instead)")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated stage in {list(v)}")
        return tuple(sorted(v))


class BackboneSpec(Frozen):
    """A timm backbone plus the paper-faithful options timm lacks.

    ResNet family (resnet*, resnext*, wide_resnet*) and, with an attention slot, EfficientNet,
    MobileNetV3 and RegNet (ablations/families.py). `layers`, `channels`, `block` and `stride_in_1x1`
    are ResNet options; `width` is the others' way to be small.
    """

    arch: str = Field(
        "resnet50", description=(
            "timm model name (resnet18..152, resnext50_32x4d, efficientnet_b0, regnety_002, ...)"))
    layers: tuple[int, ...] | None = Field(None, description="blocks per stage, overrides the arch's depth")
    channels: tuple[int, ...] | None = Field(
        None, description="per-stage base widths (timm `channels`), for small profiles")
    block: Literal["basic", "bottleneck"] | None = Field(None, description="override the arch's block type")
    num_classes: int = Field(1000, gt=1, description="classifier outputs; must match the data set")
    in_chans: int = Field(3, gt=0, description="input channels")
    small_stem: bool = Field(
        False, description=(
            "no downsampling before stage 3 (total stride 8), for 32x32-sized inputs: ResNet: 3x3 stride-1 stem "
            "conv, no max-pool; other families: stride-1 stem and stage 2 (families.py)"))
    width: float | None = Field(
        None, gt=0, description=(
            "channel multiplier of EfficientNet/MobileNetV3/RegNet (None: the arch's own widths); ResNets have "
            "`channels` instead"))
    stride_in_1x1: bool = Field(
        False, description="stride in the first 1x1 of downsampling bottlenecks (original ResNet)")
    zero_init_last: bool = Field(
        False, description=(
            "timm's zero-init of each block's last BN (the paper: off; it would hand standard SE all-zero inputs "
            "at initialisation)"))

    @model_validator(mode="after")
    def _stage_lists_agree(self) -> BackboneSpec:
        if self.layers is not None and self.channels is not None and len(self.layers) != len(self.channels):
            raise ValueError(f"layers has {len(self.layers)} stages but channels has {len(self.channels)}")
        for name in ("layers", "channels"):
            values = getattr(self, name)
            if values is not None and (len(values) != 4 or min(values) < 1):
                raise ValueError(f"{name} needs 4 positive integers (stages 2..5), got {list(values)}")
        return self


class Published(Frozen):
    """Numbers a row's source published (ImageNet unless the source says otherwise), with the citation."""

    top1_err: float | None = Field(None, description="top-1 error (%)")
    top5_err: float | None = Field(None, description="top-5 error (%)")
    params_m: float | None = Field(None, description="parameters (millions)")
    gflops: float | None = Field(
        None, description="multiply-accumulates (billions) at the source's input size")
    source: str = Field(min_length=1, description="paper and table, and where the numbers were read")


class Setting(Frozen):
    """One row of an ablation table: a label, an SE spec (None = no SE) and backbone overrides."""

    label: str = Field(min_length=1, description='the row label, as in the paper: "r=16", "SE-PRE", "ResNet-50"')
    se: SESpec | None = Field(SESpec(), description="None: the plain backbone (the table's reference row)")
    backbone: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the profile's backbone keys")
    published: Published | None = Field(
        None, description=(
            "this row's published numbers and their source (sweeps of no paper table); None: the paper's table, "
            "if the sweep names one"))

    @field_validator("label")
    @classmethod
    def _label_fits(cls, v: str) -> str:
        return _unless(rundir.label_problem(v), v)

    @property
    def slug(self) -> str:
        """The run directory's name for this label (rundir.label_dir)."""
        return rundir.label_dir(self.label)


class NamedSpec(Frozen):
    """A sweep or a profile: its `name` is a directory of the results layout (rundir.name_problem)."""

    KIND: ClassVar[str]

    @field_validator("name", check_fields=False)
    @classmethod
    def _identifier(cls, v: str) -> str:
        return _unless(rundir.name_problem(v, cls.KIND), v)


class Sweep(NamedSpec):
    """One ablation axis: an ordered list of settings, trained `seeds` times each."""

    KIND = "sweep"

    name: str = Field(description="study name prefix; defaults to the file's stem")
    description: str = Field("", description="one paragraph shown in tables and the dashboard")
    table: int | None = Field(
        None, description="the paper's table number this sweep reproduces (None: a sweep of your own)")
    reference: str | None = Field(None, description="label of the row deltas are measured against")
    seeds: int = Field(3, gt=0, le=MAX_SEEDS, description="default seeds per setting")
    settings: tuple[Setting, ...] = Field(min_length=1, description="rows, in the paper's order")
    path: str | None = Field(None, description="where it was loaded from (not a YAML key)")

    @field_validator("table")
    @classmethod
    def _known_table(cls, v: int | None) -> int | None:
        return _check_tables((v,))[0] if v is not None else None

    def published_numbers(self, label: str) -> dict[str, float | None]:
        """The published numbers of one row: the setting's own `published:` if it has one, else the
        paper's row of this sweep's table."""
        setting = next((s for s in self.settings if s.label == label), None)
        if setting is not None and setting.published is not None:
            return {k: getattr(setting.published, k) for k in paper.FIELDS}
        return paper.published_row(self.table, label)

    @property
    def has_own_sources(self) -> bool:
        """Whether some row carries published numbers of its own (not the paper's table)."""
        return any(s.published is not None for s in self.settings)

    @model_validator(mode="after")
    def _labels(self) -> Sweep:
        labels = [s.label for s in self.settings]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels {dupes}")
        by_dir: dict[str, list[str]] = {}
        for s in self.settings:  # case-insensitive: macOS and Windows file systems are
            by_dir.setdefault(s.slug.casefold(), []).append(s.label)
        clash = next((group for group in by_dir.values() if len(group) > 1), None)
        if clash:
            raise ValueError(f"labels {clash} map to the same directory name {rundir.label_dir(clash[0])!r}")
        if self.reference is not None and self.reference not in labels:
            raise ValueError(f"reference {self.reference!r} is not one of the labels {labels}")
        return self


def _check_tables(tables: tuple[int, ...]) -> tuple[int, ...]:
    known = paper.tables()
    for t in tables:
        if t not in known:
            raise ValueError(f"the paper has no published Table {t} (known: {', '.join(map(str, sorted(known)))}; "
                             "leave `table` out for a sweep of your own)")
    return tables


class DataSpec(Frozen):
    """Where images come from and how they are shaped."""

    dataset: Literal["digits", "synthetic", "cifar10", "cifar100", "imagefolder"] = Field(
        "digits", description="the images: scikit-learn's digits, synthetic, CIFAR-10/100 (--data-root), or "
                              "an ImageNet-style folder (--data-root: train/<class>/*, val/<class>/*)")
    root: str | None = Field(None, description="data root for cifar10/cifar100/imagefolder (--data-root)")
    download: bool = Field(False, description="let torchvision download CIFAR where the network allows")
    input_size: int = Field(32, gt=0, description="square input side the model sees")
    batch_size: int = Field(128, gt=0, description="global training batch")
    eval_batch_size: int = Field(512, gt=0, description="evaluation batch")
    workers: int = Field(
        4, ge=0, description="DataLoader workers (imagefolder only; in-memory sets need none)")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="imagefolder JPEGs: cpu (PIL in workers) | gpu (nvJPEG, CUDA only)")
    synthetic_size: int = Field(2048, gt=0, description="synthetic: training images (val is a quarter)")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits: held-out stratified fraction")
    crop_padding: int | None = Field(
        None, ge=0, description="in-memory sets: pad-and-crop pixels (None: input_size//8)")
    hflip: bool = Field(
        True, description="random horizontal flip in training (off for digits: a mirrored 2 is no 2)")


class TrainSpec(Frozen):
    """The optimisation recipe."""

    epochs: int = Field(10, gt=0, description="passes over the training set")
    lr: float = Field(0.1, gt=0, description="peak learning rate for the global batch")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(1e-4, ge=0, description="L2 penalty")
    wd_skip_bn_bias: bool = Field(True, description="no weight decay on BN parameters and biases")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    schedule: Literal["step", "cosine", "constant", "plateau"] = Field(
        "cosine", description="LR schedule after warmup")
    step_every: int = Field(30, gt=0, description="step schedule: decay every this many epochs (paper: 30)")
    step_gamma: float = Field(
        0.1, gt=0, le=1, description="step and plateau schedules: decay factor (paper: 0.1)")
    patience: int = Field(
        10, gt=0, description="plateau: epochs without validation-loss improvement before a cut")
    max_cuts: int = Field(
        3, ge=0, description="plateau: LR cuts; the plateau after the last one ends training")
    plateau_threshold: float = Field(
        1e-4, ge=0, lt=1, description=(
            "plateau: relative loss improvement that counts (torch ReduceLROnPlateau's default, mode rel)"))
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup length")
    precise_bn: int = Field(
        0, ge=0, description=(
            "BN statistics recomputed over this many training batches before each evaluation (pycls's precise "
            "BN); 0: the running averages"))
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(
        True, description="channels_last memory format (CUDA and CPU: faster for oneDNN convs too)")
    compile: bool = Field(
        False, description=(
            "torch.compile the model; compiled before the first epoch, its time is compile_seconds (not in "
            "train_seconds or images_per_s)"))
    sync_bn: bool | None = Field(
        None, description=(
            "DDP: batch norm over the global batch (all-reduces per BN layer and step); None: on when a rank's "
            "batch is under 32 images, where per-rank statistics get noisy"))
    checkpoint_every_epochs: int | None = Field(
        1, gt=0, description="checkpoint after this many epochs since the last one (None: by minutes only)")
    checkpoint_every_minutes: float | None = Field(
        None, gt=0, description="also checkpoint after an epoch that ends this many minutes after the last one")
    deterministic: bool = Field(False, description="deterministic algorithms (bitwise-repeatable on CPU)")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch's default)")

    @model_validator(mode="after")
    def _some_checkpoints(self) -> TrainSpec:
        if self.checkpoint_every_epochs is None and self.checkpoint_every_minutes is None:
            raise ValueError("checkpoint_every_epochs and checkpoint_every_minutes are both null: set one "
                             "(a run would keep no checkpoint before its last epoch)")
        return self


class Profile(NamedSpec):
    """Backbone + data + recipe: where and how big a sweep runs (quick / cifar / paper)."""

    KIND = "profile"

    name: str = Field(description="profile name (letters, digits, underscore); defaults to the file's stem")
    description: str = Field("", description="one line for --help and the README")
    comparable_tables: tuple[int, ...] = Field(
        (), description=(
            "paper tables whose published numbers this recipe reproduces (empty: compare ranks and directions "
            "only, not errors)"))
    backbone: BackboneSpec = Field(BackboneSpec(), description="the network every setting starts from")
    families: dict[Literal["efficientnet", "mobilenetv3", "regnet"], dict[str, Any]] = Field(
        default_factory=dict, description=(
            "backbone keys for rows whose arch is of that family (they have no ResNet `channels`, so each "
            "profile says how small they run: e.g. `width`)"))
    data: DataSpec = Field(DataSpec(), description="where images come from and how they are shaped")
    train: TrainSpec = Field(TrainSpec(), description="the optimisation recipe")
    path: str | None = Field(None, description="where it was loaded from (not a YAML key)")

    @field_validator("families")
    @classmethod
    def _backbone_keys(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for family, keys in v.items():
            unknown = sorted(set(keys) - set(BackboneSpec.model_fields))
            if unknown:
                raise ValueError(f"{family}.{unknown[0]}: unknown backbone key")
        return v

    @field_validator("comparable_tables")
    @classmethod
    def _known_tables(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _check_tables(v)


class RunConfig(Frozen):
    """Everything one trial needs: resolved profile + setting + seed. Written as config.yaml."""

    sweep: str = Field(description='sweep name ("" for a single `ablate train`)')
    profile: str = Field(description="profile name")
    setting: str = Field(description="setting label")
    seed: int = Field(ge=0, description="RNG seed")
    se: SESpec | None = Field(description="None: no SE")
    backbone: BackboneSpec = Field(description="the profile's backbone with the setting's overrides")
    data: DataSpec = Field(description="the profile's data")
    train: TrainSpec = Field(description="the profile's recipe")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
