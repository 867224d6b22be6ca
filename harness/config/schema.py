"""The protocol schema: typed, frozen dataclasses, each field with its default and the values it accepts.

A field's range is declared once, beside it, with `rule(...)` (see fields.py for the checks and their messages).
This module imports nothing from the harness: every other module may import it.

What this module does not hold: reading YAML (yaml_lines.py), converting and checking values (fields.py), building a
protocol from a file (load.py), or any knowledge of a model backend, a method or a metric (their registries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_METHOD = "dreambooth"
# DreamBench uses a separate prompt list for live subjects (pets); these class nouns select it by default.
LIVE_CLASSES = frozenset({"dog", "cat", "puppy", "kitten", "animal", "pet"})
STEP_INDEPENDENT_SCHEDULES = frozenset({"constant", "constant_with_warmup"})
GRID_SUBJECT_KEY = "subject"

Dtype = Literal["fp16", "bf16", "fp32"]
MixedPrecision = Literal["no", "fp16", "bf16"]


def rule(default: Any, *, min: float | None = None, gt: float | None = None, max: float | None = None,
         below: float | None = None, multiple_of: int | None = None, null: str | None = None,
         hint: str | None = None, identity: bool = True) -> Any:
    """A dataclass field with its accepted range, checked by fields.check_rules.

    min/max are inclusive bounds, gt/below exclusive ones; `null` says what None means when None is allowed
    ("no clipping"); `hint` is appended to every message of the field; `identity=False` marks a training field
    that does not change the trained weights (left out of the run key).
    """
    meta = {"min": min, "gt": gt, "max": max, "below": below, "multiple_of": multiple_of, "null": null,
            "hint": hint, "identity": identity}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class ModelSpec:
    """The base text-to-image model: a hub id or a local diffusers folder, or a registered backend's name
    (`tiny`: random, offline; `toyworld`: the shipped toy model)."""

    id: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: Dtype = "fp16"  # dtype of the frozen components and of inference


@dataclass(frozen=True)
class SubjectSpec:
    """One subject: its instance images and how prompts name it."""

    name: str
    instance_dir: Path
    class_noun: str | None = None
    identifier: str = "sks"
    instance_prompt: str = "a {identifier} {class}"
    class_prompt: str = "a {class}"
    kind: Literal["auto", "object", "live"] = "auto"
    eval_prompts: tuple[str, ...] | None = None  # None: DreamBench's list for the subject's kind

    @property
    def live(self) -> bool:
        if self.kind == "auto":
            return (self.class_noun or "").lower() in LIVE_CLASSES
        return self.kind == "live"

    def fill(self, template: str) -> str:
        """A prompt template with `{identifier}` and `{class}` filled in."""
        return template.replace("{identifier}", self.identifier).replace("{class}", self.class_noun or "")

    @property
    def instance_text(self) -> str:
        return self.fill(self.instance_prompt)

    @property
    def class_text(self) -> str:
        return self.fill(self.class_prompt)


@dataclass(frozen=True)
class TrainSpec:
    """Training settings every method shares. Every field can also be a `grid:` axis.

    A method may prefer other defaults (its `train_defaults`, learning rate first of all); they apply to the
    fields a protocol leaves unset. The settings of one method live in that method's own section.
    """

    method: str = DEFAULT_METHOD
    steps: int = rule(400, min=1)
    learning_rate: float = rule(5e-6, gt=0, max=1e-2, hint="DreamBooth uses 5e-6")
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = rule(0, min=0)
    batch_size: int = rule(1, min=1)
    resolution: int = rule(512, min=8, multiple_of=8)
    seed: int = rule(0, min=0)
    prior_loss_weight: float = rule(1.0, min=0, hint="0 turns prior preservation off")
    num_class_images: int = rule(100, min=0)
    mixed_precision: MixedPrecision = "bf16"
    gradient_checkpointing: bool = rule(True, identity=False)
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"
    adam_beta1: float = rule(0.9, min=0, below=1)
    adam_beta2: float = rule(0.999, min=0, below=1)
    adam_weight_decay: float = rule(1e-2, min=0)
    adam_epsilon: float = rule(1e-8, gt=0)
    max_grad_norm: float | None = rule(1.0, gt=0, null="no clipping")
    memory_mode: Literal["fast", "low_memory"] = "fast"
    snr_gamma: float | None = rule(None, gt=0, null="off", hint="5.0 is the usual value")
    offset_noise: float = rule(0.0, min=0, below=1, hint="0.05-0.1 are usual")
    checkpoint_every: int | None = rule(None, min=1, null="no checkpoints", identity=False)
    save: Literal["none", "final"] = rule("none", identity=False)
    # torch.compile of the phase: `auto` where it pays back (harness/fastpath.py), true, false; never in an identity
    compile: Literal["auto"] | bool = rule("auto", identity=False)

    @property
    def uses_prior(self) -> bool:
        return self.prior_loss_weight > 0

    @property
    def snapshots_share_a_run(self) -> bool:
        """True when the schedule does not depend on the total step count, so one run serves every step value."""
        return self.lr_schedule in STEP_INDEPENDENT_SCHEDULES


# The ClassImageSpec fields that describe generation: a folder pool has no use for them.
CLASS_GENERATION_FIELDS = ("sampler", "steps", "guidance_scale", "seed", "batch_size", "negative_prompt")


@dataclass(frozen=True)
class ClassImageSpec:
    """Where the class images for prior preservation come from: generated by the base model (the diffusers example's
    defaults) or a folder of your own photos (`source: folder`, `dir`), prepared like instance images."""

    sampler: Literal["pndm", "ddim", "dpmsolver++", "euler", "euler_a"] = "pndm"
    steps: int = rule(50, min=1)
    guidance_scale: float = rule(7.5, min=0)
    seed: int = rule(0, min=0)
    # Neither changes which images a pool holds (each image has its own seed), so neither is part of its identity.
    batch_size: int | None = rule(None, min=1, null="automatic", identity=False)  # None: the largest that fits
    negative_prompt: str = ""
    # torch.compile of the phase: `auto` where it pays back (harness/fastpath.py), true, false; never in an identity
    compile: Literal["auto"] | bool = rule("auto", identity=False)
    source: Literal["generated", "folder"] = "generated"
    dir: Path | None = None  # the folder of class images with source: folder (relative to the protocol file)

    @property
    def from_folder(self) -> bool:
        return self.source == "folder"


DEFAULT_CLASS_EVAL_PROMPTS = (
    "a {class}",
    "a photo of a {class}",
    "a {class} in the jungle",
    "a {class} on the beach",
    "a {class} in the snow",
    "a {class} on a cobblestone street",
)


@dataclass(frozen=True)
class EvalSpec:
    """How snapshots are sampled and scored."""

    backbones: str = "real"  # a registered backbone set (embedders.BACKBONES)
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    class_prompts: tuple[str, ...] = DEFAULT_CLASS_EVAL_PROMPTS
    sampler: Literal["dpmsolver++", "pndm", "ddim", "euler", "euler_a"] = "dpmsolver++"
    steps: int = rule(25, min=1)
    guidance_scale: float = rule(7.5, min=0)
    batch_size: int | None = rule(None, min=1, null="automatic")  # None: the largest batch that fits
    metrics: tuple[str, ...] = ("dino", "clip_i", "clip_t", "pres", "div_subject", "div_class", "div_lpips",
                                "div_lpips_class")
    lpips_net: Literal["alex", "vgg"] = "alex"  # the LPIPS trunk of div_lpips*; AlexNet, as its authors advise
    bootstrap_samples: int = rule(1000, min=100, hint="fewer gives no usable interval")
    max_subject_prompts: int | None = rule(None, min=1, null="all")  # None: all prompts of the list
    compile: Literal["auto"] | bool = "auto"  # evaluation and base-model sampling (harness/fastpath.py)


@dataclass(frozen=True)
class OutputSpec:
    """Where things are written. Relative paths are relative to the working directory."""

    runs_dir: Path = Path("runs")
    cache_dir: Path = Path("cache")
    results_dir: Path = Path("results")
    reports_dir: Path = Path("reports")


DEFAULT_MAX_GRID_POINTS = 10_000


@dataclass(frozen=True)
class LimitSpec:
    """Guards against a grid far bigger than intended, checked when the protocol loads, before anything is expanded."""

    # The grid's cartesian product times its subjects, counted before runs are merged (snapshots, λ = 0).
    max_grid_points: int = rule(DEFAULT_MAX_GRID_POINTS, min=1)


@dataclass(frozen=True)
class ExecutionSpec:
    """Where the runs execute: `local` workers on this machine, or a `slurm` job array. Nothing here changes a
    result beyond float rounding, so none of it is part of a run's identity; the command line overrides any of it."""

    executor: str = "local"  # a registered executor (harness/executors)
    # every process asks the GPU for deterministic kernels (devices.use_deterministic_kernels): slower, and the
    # numbers then stay the same however the runs are spread over GPUs, processes and invocations
    deterministic: bool = False
    # local: the CUDA devices to use (indices as this process sees them); None: every visible GPU
    gpus: tuple[int, ...] | None = None
    # local: worker processes; None: one per GPU (one in the command's own process without a GPU)
    workers: int | None = rule(None, min=1, null="one per GPU, or one without a GPU")
    # slurm: the sbatch settings of every job
    partition: str | None = None
    time_limit: int = rule(240, min=1, hint="minutes per job (sbatch --time)")
    gpus_per_task: int = rule(1, min=0, hint="0 on a CPU-only partition")
    cpus_per_task: int | None = rule(None, min=1, null="the partition's default")
    mem_gb: float | None = rule(None, gt=0, null="the partition's default")
    account: str | None = None
    slurm_array_parallelism: int | None = rule(None, min=1, null="as many tasks at once as Slurm allows")
    sbatch: tuple[str, ...] = ()  # more sbatch options, e.g. ["--qos=high", "--constraint=a100"]
    setup: tuple[str, ...] = ()  # shell lines run before each job's Python, e.g. ["module load cuda"]
    log_dir: Path = Path("slurm_logs")  # job scripts, logs and progress; on the filesystem the nodes share


@dataclass(frozen=True)
class Protocol:
    name: str
    path: Path
    model: ModelSpec
    subjects: tuple[SubjectSpec, ...]
    train: TrainSpec
    class_images: ClassImageSpec
    eval: EvalSpec
    output: OutputSpec
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    description: str = ""
    # The settings of every method the study trains, as (method name, its settings dataclass), the training values
    # a method's own section sets for its runs, and the training fields the protocol left unset (where each
    # method's own defaults apply).
    methods: tuple[tuple[str, Any], ...] = ()
    method_train: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    train_unset: frozenset[str] = frozenset()
    notes: tuple[str, ...] = field(default=(), compare=False)  # non-fatal remarks (e.g. a moved model id)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec, compare=False)
    limits: LimitSpec = LimitSpec()

    def subject(self, name: str) -> SubjectSpec:
        return next(s for s in self.subjects if s.name == name)

    def method_settings(self, method: str) -> Any:
        return dict(self.methods)[method]

    def method_train_values(self, method: str) -> dict[str, Any]:
        """The training values written in `method`'s own section (they apply to its runs only)."""
        return dict(dict(self.method_train).get(method, ()))

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods the study trains: the grid's `method` axis, or train.method."""
        return tuple(dict(self.grid).get("method", (self.train.method,)))

    @property
    def grid_subjects(self) -> tuple[str, ...]:
        """The names of the subjects the grid trains: its `subject` axis, or every subject."""
        return tuple(dict(self.grid).get(GRID_SUBJECT_KEY, tuple(s.name for s in self.subjects)))

    @property
    def grid_size(self) -> int:
        """Grid points: the product of the axes' lengths times the subjects, before runs are merged."""
        size = len(self.grid_subjects)
        for key, values in self.grid:
            if key != GRID_SUBJECT_KEY:
                size *= len(values)
        return size

    @property
    def results_dir(self) -> Path:
        return self.output.results_dir / self.name

    @property
    def reports_dir(self) -> Path:
        return self.output.reports_dir / self.name
