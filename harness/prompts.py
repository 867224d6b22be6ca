"""Evaluation prompt lists: DreamBench's subject prompts (objects and live subjects) and the class prompts.

Templates use `{identifier}` (the subject's token) and `{class}` (its class noun). The lists ship as text files in
`protocols/prompts/`. Nothing here generates images.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from harness.config import EvalSpec, SubjectSpec

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "protocols" / "prompts"


@cache
def read_prompt_file(path: Path) -> tuple[str, ...]:
    """Non-empty, non-comment lines of a prompt file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def subject_prompt_templates(subject: SubjectSpec, spec: EvalSpec) -> tuple[str, ...]:
    """The subject's own list, or DreamBench's list for its kind (live subjects or objects)."""
    if subject.eval_prompts is not None:
        templates = subject.eval_prompts
    else:
        templates = read_prompt_file(PROMPTS_DIR / ("dreambench_live.txt" if subject.live else "dreambench_object.txt"))
    if spec.max_subject_prompts is not None:
        templates = templates[: spec.max_subject_prompts]
    return templates


def subject_prompts(subject: SubjectSpec, spec: EvalSpec) -> tuple[str, ...]:
    """Subject prompts with the identifier and class filled in ("a sks dog in the jungle")."""
    return tuple(subject.fill(t) for t in subject_prompt_templates(subject, spec))


def class_prompts(subject: SubjectSpec, spec: EvalSpec) -> tuple[str, ...]:
    """Class prompts for drift and diversity ("a dog in the jungle"): the subject is never named."""
    return tuple(subject.fill(t) for t in spec.class_prompts)
