"""The toy world's example subject: five renders of the blue box with orange diagonal stripes.

`python -m harness.toyworld.subject` writes them to examples/subjects/toy_box/ (the repository ships the result, and
a test checks that the files are exactly what the renderer draws). The views differ in setting, place and size, as
a user's photos of an object would.

What this module does not hold: rendering itself (world.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from harness.toyworld.world import SUBJECT, Scene, render

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "examples" / "subjects" / "toy_box"

SUBJECT_VIEWS: tuple[Scene, ...] = (
    replace(SUBJECT, setting="sand", position="center", size="big", seed=101),
    replace(SUBJECT, setting="grass", position="left", size="medium", seed=102),
    replace(SUBJECT, setting="snow", position="right", size="medium", seed=103),
    replace(SUBJECT, setting="bricks", position="center", size="medium", seed=104),
    replace(SUBJECT, setting="sand", position="right", size="small", seed=105),
)


def view_name(index: int, scene: Scene) -> str:
    return f"{index:02d}_{scene.setting}_{scene.position}_{scene.size}.png"


def write_subject(folder: Path = DEFAULT_FOLDER) -> list[Path]:
    """Renders every view into `folder` as PNG; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(SUBJECT_VIEWS):
        path = folder / view_name(index, scene)
        render(scene).save(path, optimize=False)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.toyworld.subject", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FOLDER)
    args = parser.parse_args(argv)
    for path in write_subject(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
