"""The Colab notebooks: both run top to bottom on the tiny model, write what they promise, and are committed clean.

The notebooks run in a kernel of the current interpreter (a kernel spec written into a temporary folder), so the
test needs nothing beyond `pip install -r requirements-dev.txt`: no `ipykernel install`, no user-wide kernel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
TRAIN = NOTEBOOKS / "train_colab.ipynb"
INFERENCE = NOTEBOOKS / "inference.ipynb"
KERNEL_NAME = "harness-test-python"

pytestmark = pytest.mark.slow  # each notebook runs a study in a kernel: minutes on a CPU


def current_python_kernel(folder: Path) -> KernelManager:
    """A kernel manager whose kernel is this interpreter running ipykernel, found in `folder` only."""
    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python (tests)", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def execute(path: Path, work: Path, overrides: dict[str, object]) -> nbformat.NotebookNode:
    """Runs the notebook from the repository root with the parameters cell's values overridden."""
    nb = nbformat.read(path, as_version=4)
    cell = parameters_cell(nb)
    cell.source += "\n" + "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    client = NotebookClient(nb, km=current_python_kernel(work), timeout=120,
                            resources={"metadata": {"path": str(REPO)}})
    client.execute()
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/markdown", "")))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def image_outputs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, Path]:
    work = tmp_path_factory.mktemp("work")
    nb = execute(TRAIN, work, {"TINY": True, "WORK_DIR": str(work), "PROTOCOL_NAME": "nbtest"})
    return nb, work


def test_training_notebook_writes_protocol_report_and_pipeline(trained):
    nb, work = trained
    protocol = (work / "protocols" / "nbtest.yaml").read_text()
    assert "id: tiny" in protocol and "resolution: 32" in protocol and f"runs_dir: {work / 'runs'}" in protocol
    report = work / "reports" / "nbtest" / "report.md"
    assert "tiny random models" in report.read_text()
    saved = list((work / "exports").glob("*/pipeline/model_index.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["_class_name"] == "StableDiffusionPipeline"
    kept = json.loads((saved[0].parent.parent / "spec.json").read_text())["train"]
    assert (kept["prior_loss_weight"], kept["steps"], kept["save"]) == (1.0, 4, "final")  # KEEP, tiny steps
    text = outputs_text(nb)
    assert "Rough time on a T4" in text and "exit status 0" in text and f"saved pipeline: {saved[0].parent}" in text
    assert "Pipeline check only" in text  # the report's markdown is displayed
    assert image_outputs(nb) >= 2  # its plots and grids are displayed from their files


def test_inference_notebook_compares_saved_pipeline_with_base(trained):
    _, work = trained
    nb = execute(INFERENCE, work, {"TINY": True, "WORK_DIR": str(work), "SEEDS": [0, 1],
                                   "EXTRA_PROMPTS": ["a {identifier} {cls} on the beach"]})
    saved = next((work / "exports").glob("*/pipeline"))
    assert f"fine-tuned: {saved}" in outputs_text(nb)
    checks = Image.open(work / "inference" / "checks.png")
    extra = Image.open(work / "inference" / "extra.png")
    assert checks.width > extra.width  # base and fine-tuned columns against fine-tuned only
    assert {p.name for p in (work / "inference" / "fine-tuned").iterdir()} == {
        "a-sks-dog-in-a-bucket-seed0.png", "a-sks-dog-in-a-bucket-seed1.png", "a-dog-running-seed0.png",
        "a-dog-running-seed1.png", "a-sks-dog-on-the-beach-seed0.png", "a-sks-dog-on-the-beach-seed1.png"}
    assert len(list((work / "inference" / "base").iterdir())) == 4
    assert image_outputs(nb) == 2


def test_inference_notebook_without_saved_pipeline_saves_and_loads_a_tiny_one(tmp_path: Path):
    nb = execute(INFERENCE, tmp_path, {"TINY": True, "WORK_DIR": str(tmp_path / "work"), "SEEDS": [3]})
    tiny = tmp_path / "work" / "tiny_pipeline"
    assert (tiny / "model_index.json").is_file() and f"fine-tuned: {tiny}" in outputs_text(nb)
    assert {p.name for p in (tmp_path / "work" / "inference" / "base").iterdir()} == {
        "a-sks-dog-in-a-bucket-seed3.png", "a-dog-running-seed3.png"}


@pytest.mark.parametrize("path", [TRAIN, INFERENCE], ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs_and_one_parameters_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is parameters_cell(nb), "the parameters cell must be the first code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs; clear them"
    assert "TINY" in parameters_cell(nb).source and "WORK_DIR" in parameters_cell(nb).source
