"""The JSON Schema (draft 2020-12) of the .json report: ``{"header": {...}, "records": [...]}``."""

from __future__ import annotations

import json
from importlib import resources

__all__ = ["SCHEMA_NAME", "load_schema"]

#: the schema's file name inside the ``ronan_fast.reports`` package
SCHEMA_NAME = "report.schema.json"


def load_schema() -> dict:
    """The report's JSON Schema as a dict (a fresh copy each call).

    Validate a report with the ``jsonschema`` package (not a dependency of ronan_fast)::

        import jsonschema
        jsonschema.Draft202012Validator(load_schema()).validate(report)

    A .jsonl report validates once gathered: ``{"header": first_line["header"], "records": rest}``.
    """
    text = resources.files(__package__).joinpath(SCHEMA_NAME).read_text(encoding="utf-8")
    return json.loads(text)
