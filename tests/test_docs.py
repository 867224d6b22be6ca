"""The README stays true: every protocol key and every CSV column is documented there."""

from __future__ import annotations

from dataclasses import fields

import pytest

from harness.config import ClassImageSpec, EvalSpec, ModelSpec, OutputSpec, SubjectSpec, TrainSpec
from harness.results import IMAGES_COLUMNS_DOC, REFERENCES_COLUMNS_DOC, RUNS_COLUMNS_DOC, columns_markdown
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("spec", [ModelSpec, SubjectSpec, TrainSpec, ClassImageSpec, EvalSpec, OutputSpec])
def test_every_protocol_key_is_in_the_reference(spec):
    missing = [f.name for f in fields(spec) if f"`{f.name}`" not in README]
    assert not missing, f"README's protocol reference lacks {spec.__name__} keys {missing}"


@pytest.mark.parametrize("doc", [RUNS_COLUMNS_DOC, IMAGES_COLUMNS_DOC, REFERENCES_COLUMNS_DOC])
def test_csv_column_tables_match_the_code(doc):
    assert columns_markdown(doc).strip() in README, "regenerate the README's column tables with columns_markdown"
