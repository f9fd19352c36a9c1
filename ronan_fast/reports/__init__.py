"""Reports of ``ronan-fast inspect`` for people and programs: a self-contained HTML page and the JSON Schema.

- :func:`render_html` / :func:`write_html`: one HTML file that opens offline, with the run's
  header, the belonging profile's histogram and a sortable, filterable verdict table.
- :func:`png_bytes`: an image tensor as PNG bytes, for the page's thumbnails.
- :func:`load_schema`: the JSON Schema (draft 2020-12) of the .json report.

The report format itself is described in docs/reports.md.
"""

from __future__ import annotations

from ronan_fast.reports.html import SORT_KEYS, VERDICTS, png_bytes, render_html, write_html
from ronan_fast.reports.schema import SCHEMA_NAME, load_schema

__all__ = ["render_html", "write_html", "png_bytes", "load_schema", "SCHEMA_NAME", "SORT_KEYS", "VERDICTS"]
