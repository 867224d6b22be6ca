"""The README stays true: every protocol key and every CSV column is documented there."""

from __future__ import annotations

from dataclasses import fields

import pytest

from harness.config import ClassImageSpec, EvalSpec, LimitSpec, ModelSpec, OutputSpec, SubjectSpec, TrainSpec
from harness.methods import METHODS
from harness.results import columns_markdown, images_columns_doc, references_columns_doc, runs_columns_doc
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("spec", [ModelSpec, SubjectSpec, TrainSpec, ClassImageSpec, EvalSpec, OutputSpec, LimitSpec,
                                  *(cls.settings_type for _, cls in METHODS.items())])
def test_every_protocol_key_is_in_the_reference(spec):
    missing = [f.name for f in fields(spec) if f"`{f.name}`" not in README]
    assert not missing, f"README's protocol reference lacks {spec.__name__} keys {missing}"


@pytest.mark.parametrize("doc", [runs_columns_doc, images_columns_doc, references_columns_doc])
def test_csv_column_tables_match_the_code(doc):
    assert columns_markdown(doc()).strip() in README, "regenerate the README's column tables with columns_markdown"
