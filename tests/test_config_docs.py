"""docs/configuration.md carries exactly the settings table generated from imgsvc/config.py."""

from __future__ import annotations

from imgsvc.config import Settings, markdown_table
from tests.utils import REPO

START, END = "<!-- generated: python -m imgsvc.config --markdown -->\n", "<!-- end of generated -->"


def test_configuration_doc_is_the_generated_table() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    generated = text.split(START, 1)[1].split(END, 1)[0]
    assert generated == markdown_table(), "run: python -m imgsvc.config --markdown"


def test_every_setting_is_documented_in_a_group() -> None:
    table = markdown_table()
    for name, field in Settings.model_fields.items():
        assert f"`IMGSVC_{name.upper()}`" in table, name
        assert field.description, name
