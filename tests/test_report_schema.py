"""The JSON Schema of the .json report accepts reports of the documented format and rejects broken ones."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra: pip install '.[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ronan_fast.attributor import AttributionResult  # noqa: E402
from ronan_fast.reports import load_schema  # noqa: E402

PROFILE_ID = "0123456789abcdef"


def validator():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def header(**changes) -> dict:
    h = {
        "format": "ronan-fast report", "format_version": 1, "tool": "ronan-fast", "version": "0.2.0",
        "created": "2026-12-05T07:00:00+00:00",
        "model": {"name": "default (DCGAN, Fashion-MNIST)", "fingerprint": "f" * 64},
        "reference": {"name": "reference (DCGAN, MNIST digits)", "fingerprint": "e" * 64},
        "profile": {"id": PROFILE_ID, "n": 100, "mu": -3.2, "sigma": 0.41, "rule": "grubbs-log",
                    "edit": None, "generator_name": "default (DCGAN, Fashion-MNIST)"},
        "rule": "grubbs-log", "alpha": 0.05, "critical_value": 3.207, "threshold": math.exp(-3.2 + 3.207 * 0.41),
        "settings": {"steps": 300, "lr": 0.1, "metric": "mse", "precision": "fp32", "polish": False},
        "seed": 0, "early_stop": True, "device": "cpu",
    }
    h.update(changes)
    return h


def result_records() -> list[dict]:
    """Records as AttributionResult.to_records writes them (with an unreadable file), tagged with the profile."""
    n = 3
    loss = torch.tensor([0.01, 0.2, 0.05], dtype=torch.float64)
    ref = torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64)
    cal = loss / ref
    stat = torch.tensor([-0.5, 4.0, float("inf")], dtype=torch.float64)
    res = AttributionResult(
        loss=loss, reference_loss=ref, calibrated_loss=cal, statistic=stat, critical_value=3.2,
        p_value=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), belongs=stat < 3.2, threshold=0.07,
        alpha=0.05, rule="grubbs-log", stopped_early=torch.tensor([True, False, False]),
        row_steps=torch.tensor([120, 300, 300]), images=torch.zeros(n, 1, 4, 4),
        reconstruction=torch.zeros(n, 1, 4, 4), paths=["a.png", "b <c>.png", "bad\udcff.png"],
        notes=["", "RGB->grey", ""], errors=[("gone.png", "file not found")],
    )
    return res.to_records(profile_id=PROFILE_ID)


def report(records=None, **header_changes) -> dict:
    return {"header": header(**header_changes), "records": result_records() if records is None else records}


def errors_of(doc) -> list[str]:
    # through JSON and back, as a report file would be (surrogates kept as \\u escapes)
    doc = json.loads(json.dumps(doc))
    return [e.message for e in validator().iter_errors(doc)]


def test_schema_is_valid_draft_2020_12():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert load_schema() is not load_schema()  # a fresh copy each call


def test_attribution_result_records_validate():
    assert errors_of(report()) == []


def test_uncalibrated_edited_and_empty_reports_validate():
    doc = report(reference=None)
    doc["header"]["profile"]["edit"] = "jpeg:q=75"
    assert errors_of(doc) == []
    assert errors_of(report(records=[])) == []
    rec = result_records()[0] | {"reference_loss": None, "threshold": None, "p_value": None, "statistic": None}
    assert errors_of(report(records=[rec])) == []


def test_the_profile_warning_is_text_or_null():
    for value in ("the profile's threshold is A' < 1.29: ...", None):
        doc = report()
        doc["header"]["profile"]["warning"] = value
        assert errors_of(doc) == []
    doc = report()
    doc["header"]["profile"]["warning"] = 1.29
    assert errors_of(doc)


def test_unknown_fields_are_allowed_for_newer_writers():
    doc = report()
    doc["header"]["command"] = "ronan-fast inspect ..."
    doc["records"][0]["extra"] = 1
    assert errors_of(doc) == []


@pytest.mark.parametrize("field", ["format", "format_version", "model", "reference", "profile", "rule", "alpha",
                                   "critical_value", "threshold", "settings", "seed", "early_stop", "device",
                                   "created", "version"])
def test_a_missing_header_field_is_rejected(field):
    doc = report()
    del doc["header"][field]
    assert any(repr(field) in m and "required" in m for m in errors_of(doc))


@pytest.mark.parametrize("path,value", [
    (("header", "format"), "some other report"),
    (("header", "format_version"), 2),
    (("header", "rule"), "t-test"),
    (("header", "alpha"), 1.5),
    (("header", "alpha"), "0.05"),
    (("header", "profile", "n"), 2),
    (("header", "profile", "sigma"), 0),
    (("header", "model", "fingerprint"), None),
    (("header", "settings"), {"steps": [300]}),
    (("header", "seed"), 0.5),
    (("header", "created"), "yesterday"),
    (("records", 0, "verdict"), "maybe"),
    (("records", 0, "loss"), "0.01"),
    (("records", 0, "p_value"), 1.5),
    (("records", 0, "belongs"), False),  # contradicts the verdict "belongs"
    (("records", 1, "row_steps"), 3.5),
    (("records", 1, "error"), "boom"),  # an error message on a scored record
    (("records", 3, "error"), None),  # an error record without its message
    (("records", 3, "loss"), 0.1),  # an error record with a number
])
def test_broken_reports_are_rejected(path, value):
    doc = report()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert errors_of(doc), f"{path} = {value!r} was accepted"


def test_a_scored_record_missing_a_field_is_rejected():
    for field in ("calibrated_loss", "statistic", "p_value", "profile_id", "stopped_early", "notes"):
        doc = report()
        del doc["records"][0][field]
        assert any(repr(field) in m for m in errors_of(doc)), field


def test_top_level_must_be_header_and_records():
    assert errors_of({"header": header()})
    assert errors_of(result_records())
    assert errors_of(report() | {"summary": "x"})


finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731


@st.composite
def scored_records(draw):
    belongs = draw(st.booleans())
    return {
        "path": draw(st.text(max_size=30)), "verdict": "belongs" if belongs else "does not belong",
        "belongs": belongs, "loss": draw(maybe(finite)), "reference_loss": draw(maybe(st.floats(1e-30, 1e6))),
        "calibrated_loss": draw(maybe(finite)), "statistic": draw(maybe(st.floats(-1e6, 1e6))),
        "critical_value": draw(maybe(st.floats(0, 10))), "p_value": draw(maybe(st.floats(0, 1))),
        "threshold": draw(maybe(finite)), "alpha": draw(st.floats(1e-6, 0.5)),
        "rule": draw(st.sampled_from(["grubbs", "grubbs-log"])), "stopped_early": draw(st.booleans()),
        "row_steps": draw(st.integers(0, 10**6)), "notes": draw(st.text(max_size=20)), "error": None,
        "profile_id": draw(st.text(min_size=1, max_size=16)),
    }


error_records = st.builds(lambda p, e: {"path": p, "verdict": "error", "belongs": None, "error": e},
                          st.text(max_size=30), st.text(min_size=1, max_size=40))


@settings(max_examples=50, deadline=None)
@given(records=st.lists(st.one_of(scored_records(), error_records), max_size=6))
def test_generated_reports_validate(records):
    assert errors_of(report(records=records)) == []


@settings(max_examples=50, deadline=None)
@given(record=scored_records(), field=st.sampled_from(["loss", "calibrated_loss", "statistic", "p_value",
                                                        "threshold", "alpha", "row_steps"]))
def test_a_string_where_a_number_belongs_is_rejected(record, field):
    doc = report(records=[copy.deepcopy(record) | {field: "1.0"}])
    assert any("is not of type" in m for m in errors_of(doc))
