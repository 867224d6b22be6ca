"""Does one study give the same CSVs when it is run twice, in two processes, from scratch? With and without
`execution.deterministic`.

Builds the full-size Stable Diffusion 1.5 architecture with random weights (as gpu_e2e.py: nothing downloaded),
writes gpu_e2e.py's protocol (2 runs, snapshots at 10 and 20 steps, 4 class images, 12 evaluation images a
snapshot), and for each setting runs `run_experiment.py` on it twice, each time in a folder of its own (caches,
class images and reference rows included), then compares the two CSVs row by row apart from the timing columns.
Two processes on one GPU differ the way two GPUs of one model do: so this is also what a study spread over
several GPUs gives against one. Writes bench_determinism.json in the work folder. Random weights: the agreement is
real, the metrics mean nothing.

    python benchmarks/bench_determinism.py --workdir /scratch/determinism          # GPU, about 6 minutes
    python benchmarks/bench_determinism.py --tiny --workdir /var/tmp/determinism   # CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

SETTINGS = {"deterministic": ["--execution", "deterministic=true"], "default": []}


def write_protocol(folder: Path, model: str) -> Path:
    from gpu_e2e import PROTOCOL

    text = PROTOCOL.format(model=model, subject=REPO / "examples" / "subjects" / "dog", work=folder,
                           memory_mode="fast")
    if model == "tiny":
        text = text.replace("resolution: 512", "resolution: 32").replace("mixed_precision: bf16",
                                                                         'mixed_precision: "no"')
    path = folder / "gpu_e2e.yaml"
    path.write_text(text)
    return path


def invocation(folder: Path, model: str, flags: list[str]) -> dict:
    shutil.rmtree(folder, ignore_errors=True)  # from scratch: every cache and reference row is made again
    folder.mkdir(parents=True)
    protocol = write_protocol(folder, model)
    began = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "run_experiment.py"), str(protocol), *flags], cwd=folder,
                            text=True, capture_output=True)
    (folder / "output.txt").write_text(result.stdout + result.stderr)
    print(result.stdout[-1500:], flush=True)
    return {"flags": flags, "exit": result.returncode, "wall_seconds": round(time.perf_counter() - began, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench_determinism"))
    parser.add_argument("--settings", default="deterministic,default", help="comma-separated: deterministic, default")
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model = "tiny"
    else:
        from gpu_e2e import save_random_sd15

        save_random_sd15(work / "sd15-random")
        model = str(work / "sd15-random")
    from benchlib import compare_csvs, provenance

    results: dict = {"provenance": provenance(" ".join(["python benchmarks/bench_determinism.py", *sys.argv[1:]]))}
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            raise SystemExit(f"--settings: {setting!r} is neither deterministic nor default.")
        runs = [invocation(work / setting / name, model, SETTINGS[setting]) for name in ("a", "b")]
        entry: dict = {"invocations": runs}
        if all(r["exit"] == 0 for r in runs):
            entry.update(compare_csvs(*(work / setting / name / "results" / "gpu_e2e" for name in ("a", "b"))))
        results[setting] = entry
        print(f"== {setting}: {json.dumps({k: v for k, v in entry.items() if k != 'invocations'})}", flush=True)
    (work / "bench_determinism.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(all(r["exit"] == 0 for r in results[s]["invocations"]) for s in args.settings.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
