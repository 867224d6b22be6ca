"""Expansion of a protocol's grid into canonical, deduplicated runs, each with a stable `run_key`.

A `RunSpec` is one training trajectory: the subject, the base model, the training settings and the steps at which
it is sampled (its snapshots). Three rules make a study cheap without changing its answer:

- steps are snapshots of one run when the learning-rate schedule does not depend on the total step count
  (constant schedules): the run to 1200 steps is sampled at 200, 400, 800 and 1200;
- a run with n class images uses the first n images of one shared class-image pool (class_images.py);
- with prior_loss_weight 0 no class image is used, so the class-image axis collapses to one run.

The run key is the sha256 of the run's identity: every field that changes the trained weights and nothing else
(not output folders, not the subject's display name, not evaluation settings). A field added after identity
version 1 joins the identity only away from its default, so adding a field never changes an existing key.
Each point of the grid trains one method with its settings (`method` is an axis like any other; a method's
settings vary as `rank: [...]` or `lora.rank: [...]`); a method's own section may set training values for its runs,
and its preferred training defaults (its learning rate) apply to the fields the protocol left unset. A method that
brings its own token (Custom Diffusion's modifier token) names the subject with it in the run's prompts.
Nothing here loads a model or decodes an image; the instance folder's bytes are hashed (data.folder_digest).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from harness.config import GRID_SUBJECT_KEY, ClassImageSpec, ModelSpec, Protocol, SubjectSpec, TrainSpec
from harness.config.fields import field_names, in_identity
from harness.data import folder_digest
from harness.methods import METHODS, settings_identity
from harness.prompts import subject_prompts

IDENTITY_VERSION = 1
RUN_KEY_LENGTH = 12
# The training fields of identity version 1: always in the identity (today's keys hold them, defaults included).
IDENTITY_V1_FIELDS = frozenset({
    "method", "steps", "learning_rate", "lr_schedule", "lr_warmup_steps", "batch_size", "resolution", "seed",
    "prior_loss_weight", "num_class_images", "mixed_precision", "gradient_checkpointing", "optimizer", "adam_beta1",
    "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "train_text_encoder", "memory_mode",
    "snr_gamma", "offset_noise", "checkpoint_every", "save",
})


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid and the steps at which it is sampled."""

    run_key: str
    subject: SubjectSpec
    model: ModelSpec
    train: TrainSpec  # train.steps is the last snapshot
    method: Any  # the settings of train.method (its settings dataclass)
    class_images: ClassImageSpec | None  # None when prior preservation is off
    snapshot_steps: tuple[int, ...]
    instance_digest: str
    varied: tuple[tuple[str, Any], ...]  # the grid fields of this run (for tables), in grid order
    class_digest: str | None = None  # content digest of the class-image folder (class_images source: folder)

    def identity(self) -> dict[str, Any]:
        return run_identity(self.subject, self.model, self.train, self.method, self.class_images,
                            self.instance_digest, self.class_digest)

    def to_json(self) -> dict[str, Any]:
        """Everything about the run, for spec.json: its identity plus what is only descriptive."""
        return {
            "run_key": self.run_key,
            "identity": self.identity(),
            "subject": self.subject.name,
            "snapshot_steps": list(self.snapshot_steps),
            "varied": dict(self.varied),
            "train": _jsonable(asdict(self.train)),
            "method_settings": _jsonable(asdict(self.method)),
        }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_identity(
    subject: SubjectSpec,
    model: ModelSpec,
    train: TrainSpec,
    method: Any,
    class_images: ClassImageSpec | None,
    instance_digest: str,
    class_digest: str | None = None,
) -> dict[str, Any]:
    """The fields that determine the trained weights, in canonical form. `subject` is the run's (its identifier
    is the method's token where the method brings one); `class_digest` is the content digest of a class folder."""
    left_out = {name for name in field_names(TrainSpec) if not in_identity(TrainSpec, name)}
    if train.snapshots_share_a_run:
        left_out.add("steps")  # the trajectory is the same whatever its length; steps are snapshots
    if not train.uses_prior:
        left_out.add("num_class_images")
    training = {f.name: getattr(train, f.name) for f in fields(train)
                if f.name not in left_out and (f.name in IDENTITY_V1_FIELDS or getattr(train, f.name) != f.default)}
    legacy, other = settings_identity(METHODS.get(train.method), method)
    training.update(legacy)
    identity = {
        "version": IDENTITY_VERSION,
        "model": {"id": model.id, "revision": model.revision, "dtype": model.dtype},
        "subject": {
            "instance_digest": instance_digest,
            "instance_prompt": subject.instance_text,
            "class_prompt": subject.class_text if train.uses_prior else None,
        },
        "train": training,
        "class_images": _class_image_identity(class_images, class_digest),
    }
    if other:
        identity["method_settings"] = other
    return identity


def _class_image_identity(spec: ClassImageSpec | None, class_digest: str | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    if spec.from_folder:
        # The folder's content, not its place; generation settings mean nothing for it.
        return {"source": "folder", "digest": class_digest}
    # The batch size and compilation do not change the images: every image is generated from its own seed. The
    # source and its folder came later and are left out for generated pools, so existing keys stay.
    return {k: v for k, v in asdict(spec).items() if in_identity(ClassImageSpec, k) and k not in ("source", "dir")}


def run_key(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an identity (key order and float spelling do not matter), in lowercase
    base32: unlike hex, such a key practically never reads as a number in pandas (an all-digit hex key would)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.b32encode(digest).decode().lower()[:RUN_KEY_LENGTH]


def grid_points(protocol: Protocol) -> Iterator[tuple[SubjectSpec, dict[str, Any]]]:
    """Every (subject, grid values) combination, in grid order, before any deduplication; generated one at a time
    (there are `protocol.grid_size` of them, which the protocol's loader caps)."""
    axes = [(k, v) for k, v in protocol.grid if k != GRID_SUBJECT_KEY]
    names = [k for k, _ in axes]
    for subject_name in protocol.grid_subjects:
        subject = protocol.subject(subject_name)
        for values in itertools.product(*(v for _, v in axes)):
            yield subject, dict(zip(names, values, strict=True))


def canonical_train(train: TrainSpec) -> TrainSpec:
    """Equivalent settings written one way: without prior preservation the class-image count means nothing."""
    if not train.uses_prior:
        return replace(train, num_class_images=0)
    return train


def point_settings(protocol: Protocol, values: dict[str, Any]) -> tuple[TrainSpec, Any]:
    """The training settings and the method settings of one grid point.

    A training value comes from, in order: the grid point, the method's own section, `train:`, the method's
    preferred value (computed from the others), the TrainSpec default.
    """
    method = values.get("method", protocol.train.method)
    train_fields = set(field_names(TrainSpec))
    section = {k: v for k, v in protocol.method_train_values(method).items() if k not in values}
    unset = {k: TrainSpec.__dataclass_fields__[k].default for k in protocol.train_unset
             if k not in values and k not in section}
    train = replace(protocol.train, **unset, **section, **{k: v for k, v in values.items() if k in train_fields})
    preferred = METHODS.get(method).preferred_train(train)
    train = replace(train, **{k: v for k, v in preferred.items() if k in unset})
    settings = protocol.method_settings(method)
    own = set(field_names(type(settings)))
    overrides = {}
    for key, value in values.items():
        target, _, name = key.rpartition(".")
        if name in own and target in ("", method) and key not in train_fields:
            overrides[name] = value
    return canonical_train(train), replace(settings, **overrides)




def expand(protocol: Protocol, digests: dict[str, str] | None = None) -> list[RunSpec]:
    """The protocol's runs: one per distinct identity, with the steps of the grid as its snapshots.

    `digests` may pin instance-folder digests by subject name (and the class folder's under its path)."""
    digests = dict(digests or {})
    varied_keys = list(dict.fromkeys(column_name(k) for k, _ in protocol.grid))
    groups: dict[str, dict[str, Any]] = {}
    for subject, values in grid_points(protocol):
        if subject.name not in digests:
            digests[subject.name] = folder_digest(subject.instance_dir)
        train, settings = point_settings(protocol, values)
        settings, subject = METHODS.get(train.method).bind_subject(settings, subject)
        class_images = protocol.class_images if train.uses_prior else None
        class_digest = _class_digest(class_images, digests)
        identity = run_identity(subject, protocol.model, train, settings, class_images, digests[subject.name],
                                class_digest)
        key = run_key(identity)
        group = groups.setdefault(key, {"subject": subject, "train": train, "method": settings,
                                        "class_images": class_images, "steps": set(), "digest": digests[subject.name],
                                        "class_digest": class_digest})
        group["steps"].add(train.steps)
        if train.steps > group["train"].steps:
            group["train"] = train
    runs = []
    for key, g in groups.items():
        train: TrainSpec = g["train"]
        varied = tuple((k, _display_value(k, g["subject"], train, g["method"])) for k in varied_keys if k != "steps")
        runs.append(RunSpec(
            run_key=key, subject=g["subject"], model=protocol.model, train=train, method=g["method"],
            class_images=g["class_images"], snapshot_steps=tuple(sorted(g["steps"])), instance_digest=g["digest"],
            varied=varied, class_digest=g["class_digest"],
        ))
    return runs


def _class_digest(spec: ClassImageSpec | None, digests: dict[str, str]) -> str | None:
    if spec is None or not spec.from_folder:
        return None
    where = str(spec.dir)
    if where not in digests:
        digests[where] = folder_digest(spec.dir)
    return digests[where]


def column_name(grid_key: str) -> str:
    """The column (and report label) of a grid key: a method setting without its method ('lora.rank' -> 'rank')."""
    return grid_key.rpartition(".")[2]


def _display_value(key: str, subject: SubjectSpec, train: TrainSpec, settings: Any) -> Any:
    if key == GRID_SUBJECT_KEY:
        return subject.name
    if hasattr(train, key):
        return getattr(train, key)
    return getattr(settings, key, None)  # a setting of another method: not applicable to this run


@dataclass(frozen=True)
class WorkEstimate:
    training_runs: int
    optimizer_steps: int
    snapshots: int
    class_images: int
    eval_images: int
    base_model_images: int

    @property
    def images(self) -> int:
        return self.class_images + self.eval_images + self.base_model_images


def estimate_work(protocol: Protocol, runs: list[RunSpec], pools: dict[str, int]) -> WorkEstimate:
    """What running the protocol costs, before anything is done (pools: pool key -> images it must hold)."""
    seeds = len(protocol.eval.seeds)
    per_snapshot = {s.name: (len(subject_prompts(s, protocol.eval)) + len(protocol.eval.class_prompts)) * seeds
                    for s in protocol.subjects}
    base_model_sets = {(r.subject.name, r.train.resolution) for r in runs}  # generated once per subject and size
    return WorkEstimate(
        training_runs=len(runs),
        optimizer_steps=sum(r.train.steps for r in runs),
        snapshots=sum(len(r.snapshot_steps) for r in runs),
        class_images=sum(pools.values()),
        eval_images=sum(len(r.snapshot_steps) * per_snapshot[r.subject.name] for r in runs),
        base_model_images=sum(per_snapshot[name] for name, _ in base_model_sets),
    )
