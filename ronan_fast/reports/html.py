"""A report as one self-contained HTML page: run header, profile histogram, sortable verdict table.

:func:`render_html` turns a report's header and records (the format of docs/reports.md) and the
belonging profile's own calibrated losses into one HTML page that opens offline: the CSS and
script are inlined, thumbnails are ``data:`` URIs and the histogram is inline SVG. A Content
Security Policy in the page allows only that inline script and style (by hash) and ``data:``
images, so the page cannot fetch anything and no script text that slipped into it would run.

Every string from the report (paths, notes, names, settings) is HTML-escaped. Characters that
cannot be shown faithfully are written as visible escapes: ``\\xNN`` for a byte of a file name
that is not UTF-8 (a lone surrogate ``U+DC80..U+DCFF``, as Python's ``surrogateescape`` decodes
it) and for control characters, ``\\uXXXX`` for other lone surrogates and for bidirectional
text controls (which could make a file name read differently from what it is).

The page's initial sort and filter can be set in the URL fragment, e.g.
``report.html#sort=calibrated_loss&order=desc&verdict=belongs&q=cat``; clicking a column header
or changing a filter updates it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ronan_fast._atomic import write_text
from ronan_fast.reports.histogram import _histogram_svg
from ronan_fast.reports.html_inputs import (_THUMB_KINDS, VERDICTS, _check_profile, _check_record, _check_thumbnails,
                                            _get, _is_real)
from ronan_fast.reports.text import _attr, _data_value, _fmt, _fmt_p, _html, _plain

__all__ = ["VERDICTS", "SORT_KEYS", "render_html", "write_html", "png_bytes"]

#: thumbnails are shown with their longer side at most this many CSS pixels (small images are
#: enlarged by a whole factor, pixelated)
_THUMB_SIZE = 64

# The verdict table's columns: (key, heading, type, tooltip). ``key`` is what the fragment's
# ``sort=`` names; "thumbs" sorts like "index".
_COLUMNS = (
    ("index", "#", "num", "position in the report"),
    ("thumbs", "image · model · reference", "num",
     "the image, the model's reconstruction of it and the reference model's"),
    ("path", "path", "text", "the image file"),
    ("verdict", "verdict", "text", "belongs when G < G_crit"),
    ("calibrated_loss", "A′", "num", "calibrated loss A′ = A / A_r (A′ = A uncalibrated)"),
    ("loss", "A", "num", "the model's reconstruction loss"),
    ("reference_loss", "A_r", "num", "the reference model's reconstruction loss"),
    ("statistic", "G", "num", "Grubbs statistic (scale(A′) − μ) / σ"),
    ("p_value", "p", "num", "one-sided p-value of G under 'the image belongs'"),
    ("stopped_early", "stopped early", "text", "the model's inversion stopped once the verdict was settled"),
    ("row_steps", "steps", "num", "inversion steps the image took"),
    ("notes", "notes", "text", "what loading did to the image, or why it failed"),
)
#: the keys the fragment's ``sort=`` accepts
SORT_KEYS = tuple(c[0] for c in _COLUMNS)


# ----------------------------------------------------------------------------- thumbnails


def png_bytes(image) -> bytes:
    """An image as PNG file bytes, for :func:`render_html`'s thumbnails.

    ``image`` is a tensor (or NumPy array) ``[C, H, W]`` with C = 1, 3 or 4, or ``[H, W]``, values
    in [0, 1] (clamped, rounded to 8 bits).
    """
    import io

    from PIL import Image

    from ronan_fast.imageio.writing import _to_uint8_hwc

    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, torch.Tensor) and not image.is_floating_point():
        raise ValueError(f"image must be float in [0, 1], got {image.dtype} (divide 8-bit data by 255)")
    array = _to_uint8_hwc(image, "image")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _display_size(width: int, height: int) -> tuple[int, int]:
    side = max(width, height, 1)
    if side <= _THUMB_SIZE:
        k = _THUMB_SIZE // side
        return width * k, height * k
    return max(1, round(width * _THUMB_SIZE / side)), max(1, round(height * _THUMB_SIZE / side))


def _thumb_cell(i: int, kinds: dict[str, bytes | None] | None) -> str:
    if not kinds:
        return f'<td class="thumbs" data-v="{i}">—</td>'
    figures = []
    for kind in _THUMB_KINDS:
        data = kinds.get(kind)
        if data is None:
            inner = '<span class="no-thumb">none</span>'
        else:
            w, h = _display_size(*_png_size(data))
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            inner = f'<img src="{uri}" alt="{kind}" width="{w}" height="{h}">'
        figures.append(f'<figure class="thumb {kind}">{inner}<figcaption>{kind}</figcaption></figure>')
    return f'<td class="thumbs" data-v="{i}"><div class="trio">{"".join(figures)}</div></td>'


# ----------------------------------------------------------------------------- histogram


# ----------------------------------------------------------------------------- page


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _fill(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{name}}`` in one pass (text put in is never searched again)."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return values[m.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def _dl_row(term: str, value_html: str) -> str:
    return f"<dt>{term}</dt><dd>{value_html}</dd>"


def _text_or_missing(value: str | None) -> str:
    return '<span class="missing">not recorded</span>' if value is None else _html(value)


def _model_html(model: Mapping | None, name: str) -> str:
    if model is None:
        return '<span class="missing">not recorded</span>'
    label = _get(model, "name", name, "str")
    fp = _get(model, "fingerprint", name, "str")
    out = _text_or_missing(label)
    if fp is not None:
        out += f' <code class="fingerprint" title="{_attr(fp)}">{_html(fp[:16])}</code>'
    return out


def _profile_warning(header: Mapping, hp: Mapping, profile: dict) -> str | None:
    """The profile's warning (``header['profile']['warning']``), or, for a report that does not
    record one, the one its calibrated threshold calls for
    (:func:`~ronan_fast.profile_checks.weak_threshold_text`)."""
    from ronan_fast.profile_checks import weak_threshold_text

    if "warning" in hp:
        return _get(hp, "warning", "header['profile']", "str")
    calibrated = isinstance(header.get("reference"), Mapping)
    return weak_threshold_text(calibrated, profile["threshold"], profile["rule"], profile["sigma"])


def _run_section(header: Mapping, profile: dict, records: list[dict]) -> tuple[str, str, str]:
    """(summary line, definition list of the run, settings table) as HTML."""
    rows = []
    rows.append(_dl_row("tool", _html(f"{header.get('tool') or 'ronan-fast'} "
                                      f"{_get(header, 'version', 'header', 'str') or '(version not recorded)'}")))
    rows.append(_dl_row("created", _text_or_missing(_get(header, "created", "header", "str"))))
    rows.append(_dl_row("model", _model_html(_get(header, "model", "header", "dict"), "header['model']")))
    if "reference" in header and header["reference"] is None:
        ref_html = "none: uncalibrated (A′ = A)"
    else:
        ref_html = _model_html(_get(header, "reference", "header", "dict"), "header['reference']")
    rows.append(_dl_row("reference model", ref_html))
    hp = _get(header, "profile", "header", "dict") or {}
    pid = _get(hp, "id", "header['profile']", "str")
    edit = _get(hp, "edit", "header['profile']", "str")
    gen = _get(hp, "generator_name", "header['profile']", "str")
    prof_bits = [f"<code>{_html(pid)}</code>" if pid is not None else '<span class="missing">id not recorded</span>']
    if profile["n"] is not None:
        prof_bits.append(f"n = {profile['n']}")
    scale = "ln A′" if profile["rule"] == "grubbs-log" else "A′"
    prof_bits.append(f"μ = {_fmt(profile['mu'], '.6g')}, σ = {_fmt(profile['sigma'], '.6g')} (of {scale})")
    if gen:
        prof_bits.append(f"made with {_html(gen)}")
    if edit:
        prof_bits.append(f"images edited by {_html(edit)}")
    rows.append(_dl_row("belonging profile", ", ".join(prof_bits)))
    header_rule = _get(header, "rule", "header", "str")
    if header_rule is not None and header_rule != profile["rule"]:
        raise ValueError(f"header['rule'] is {header_rule!r} but profile['rule'] is {profile['rule']!r}")
    test = "one-sided Grubbs test of " + ("ln A′" if profile["rule"] == "grubbs-log" else "A′")
    rows.append(_dl_row("rule", f"<code>{profile['rule']}</code> ({test})"))
    alpha = _get(header, "alpha", "header", "num")
    crit = _get(header, "critical_value", "header", "num")
    rows.append(_dl_row("alpha", _fmt(alpha, ".4g")))
    rows.append(_dl_row("critical value", f"G_crit = {_fmt(crit, '.5g')}"))
    rows.append(_dl_row("threshold", f"images with A′ &lt; {_fmt(profile['threshold'], '.6g')} belong"))
    warning = _profile_warning(header, hp, profile)
    if warning is not None:
        rows.append(_dl_row("warning", f'<span class="warning">{_html(warning)}</span>'))
    seed = _get(header, "seed", "header", "int")
    early = _get(header, "early_stop", "header", "bool")
    device = _get(header, "device", "header", "str")
    rows.append(_dl_row("seed", "—" if seed is None else str(seed)))
    rows.append(_dl_row("early stop", "—" if early is None else ("on" if early else "off")))
    rows.append(_dl_row("device", _text_or_missing(device)))

    settings = _get(header, "settings", "header", "dict") or {}
    srows = []
    for key, value in settings.items():
        if not isinstance(key, str):
            raise ValueError(f"header['settings'] keys must be strings, got {key!r}")
        if isinstance(value, bool):
            shown = "true" if value else "false"
        elif _is_real(value):
            shown = _fmt(float(value), ".6g") if isinstance(value, float) else str(int(value))
        elif value is None:
            shown = "—"
        elif isinstance(value, str):
            shown = _html(value)
        else:
            raise ValueError(f"header['settings'][{_plain(key)!r}] must be a number, string, bool or None, "
                             f"got {type(value).__name__}")
        srows.append(f"<tr><th>{_html(key)}</th><td>{shown}</td></tr>")
    settings_html = (f'<details class="settings"><summary>inversion settings ({len(srows)})</summary>'
                     f'<table>{"".join(srows)}</table></details>') if srows else ""

    n = len(records)
    yes = sum(r["verdict"] == "belongs" for r in records)
    no = sum(r["verdict"] == "does not belong" for r in records)
    err = n - yes - no
    model = _get(header, "model", "header", "dict") or {}
    model_name = _get(model, "name", "header['model']", "str")
    summary = (f"{n} image{'s' if n != 1 else ''}: <strong>{yes}</strong> belong{'s' if yes == 1 else ''}"
               f"{' to ' + _html(model_name) if model_name else ''}, <strong>{no}</strong> "
               f"{'does' if no == 1 else 'do'} not")
    if err:
        summary += f", <strong>{err}</strong> could not be judged"
    if warning is not None:
        summary += ('<span class="warning">warning: the profile\'s threshold can hardly tell the model\'s images '
                    'from others, so a verdict of "belongs" is worth little (see Run)</span>')
    return summary, "<dl>" + "".join(rows) + "</dl>", settings_html


def _record_row(i: int, r: dict, thumbs: dict[int, dict], with_thumbs: bool) -> str:
    verdict = r["verdict"]
    vclass = {"belongs": "belongs", "does not belong": "not-belongs", "error": "error"}[verdict]
    path = r["path"]
    path_plain = _plain(path) if path is not None else ""
    cells = [f'<td class="num" data-v="{i}">{i + 1}</td>']
    if with_thumbs:
        cells.append(_thumb_cell(i, thumbs.get(i)))
    cells.append(f'<td class="path" data-v="{_attr(path or "")}">'
                 f'{_html(path) if path is not None else "<span class=missing>(no path)</span>"}</td>')
    cells.append(f'<td class="verdict" data-v="{verdict}"><span class="badge {vclass}">{verdict}</span></td>')
    for key in ("calibrated_loss", "loss", "reference_loss", "statistic"):
        v = r[key]
        cells.append(f'<td class="num" data-v="{_data_value(v)}" title="{_data_value(v)}">{_fmt(v)}</td>')
    p = r["p_value"]
    cells.append(f'<td class="num" data-v="{_data_value(p)}" title="{_data_value(p)}">{_fmt_p(p)}</td>')
    early = r["stopped_early"]
    early_text = "" if early is None else ("yes" if early else "no")
    cells.append(f'<td data-v="{early_text}">{early_text or "—"}</td>')
    steps = r["row_steps"]
    cells.append(f'<td class="num" data-v="{"" if steps is None else steps}">{"—" if steps is None else steps}</td>')
    notes = r["notes"] or ""
    text = f"{r['error']}" if verdict == "error" and r["error"] else notes
    if verdict == "error" and r["error"] and notes:
        text = f"{r['error']} ({notes})"
    cls = "notes error-text" if verdict == "error" else "notes"
    cells.append(f'<td class="{cls}" data-v="{_attr(text)}">{_html(text, keep_lines=True)}</td>')
    return (f'<tr id="r{i}" class="{vclass}" data-index="{i}" data-verdict="{verdict}" '
            f'data-path="{_attr(path_plain)}">' + "".join(cells) + "</tr>")


def render_html(
    header: Mapping,
    records: Sequence[Mapping],
    profile,
    thumbnails: Mapping[int, Mapping[str, bytes | None]] | None = None,
) -> str:
    """The report as one self-contained HTML page (a string).

    Args:
        header: the report's header (docs/reports.md); fields it lacks are shown as "not recorded".
        records: the report's records, one per image, error records included.
        profile: the belonging profile: a dict with ``rule``, ``n``, ``mu``, ``sigma`` (on the
            rule's scale), ``threshold`` (the calibrated loss at the edge of belonging) and
            ``calibrated_losses`` (the profile images' own ``A'``), or a
            :class:`~ronan_fast.profile.BelongingProfile`.
        thumbnails: per record position, PNG bytes (see :func:`png_bytes`) of the ``"image"``,
            the model's reconstruction (``"model"``) and the reference model's (``"reference"``,
            may be None); None: no image column.

    Raises:
        TypeError / ValueError naming the argument and field that is wrong (e.g. a number field
        holding a string, a verdict outside :data:`VERDICTS`, thumbnails that are not PNG bytes,
        a header whose rule differs from the profile's).
    """
    if not isinstance(header, Mapping):
        raise TypeError(f"header must be a dict, got {type(header).__name__}")
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a list of dicts, got {type(records).__name__}")
    prof = _check_profile(profile)
    recs = [_check_record(r, i) for i, r in enumerate(records)]
    thumbs = _check_thumbnails(thumbnails, len(recs))
    with_thumbs = bool(thumbs)

    summary, run_html, settings_html = _run_section(header, prof, recs)
    svg, hist_notes = _histogram_svg(prof, recs)
    heads = []
    for key, label, kind, tip in _COLUMNS:
        if key == "thumbs" and not with_thumbs:
            continue
        heads.append(f'<th scope="col" data-key="{key}" data-type="{kind}" title="{html.escape(tip)}" '
                     f'tabindex="0">{label}</th>')
    body_rows = [_record_row(i, r, thumbs, with_thumbs) for i, r in enumerate(recs)]

    css, js = _asset("report.css"), _asset("report.js")
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; "
           "base-uri 'none'; form-action 'none'")
    version = _get(header, "version", "header", "str")
    model = _get(header, "model", "header", "dict") or {}
    title = "ronan-fast report" + (f": {_plain(model['name'])}" if isinstance(model.get("name"), str) else "")
    scale = "ln A′" if prof["rule"] == "grubbs-log" else "A′"
    hist_note = "".join(f"<li>{_html(n)}</li>" for n in hist_notes)
    return _fill(_asset("template.html"), {
        "csp": html.escape(csp, quote=True),
        "generator": _attr(f"ronan-fast {version or ''}".strip()),
        "title": html.escape(title),
        "css": css,
        "js": js,
        "summary": summary,
        "run": run_html,
        "settings": settings_html,
        "histogram": svg,
        "histogram_notes": f'<ul class="notes">{hist_note}</ul>' if hist_note else "",
        "scale": scale,
        "n_profile": str(len(prof["calibrated_losses"])),
        "thead": "".join(heads),
        "tbody": "\n".join(body_rows),
        "n_records": str(len(recs)),
        "version": html.escape(version or "(version not recorded)"),
        "created": _html(_get(header, "created", "header", "str") or "an unrecorded time"),
    })


def write_html(
    path: str | os.PathLike,
    header: Mapping,
    records: Sequence[Mapping],
    profile,
    thumbnails: Mapping[int, Mapping[str, bytes | None]] | None = None,
) -> Path:
    """Write :func:`render_html`'s page to ``path`` (``.html`` or ``.htm``), atomically. Returns the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path must end in .html or .htm, got {path}")
    return write_text(path, render_html(header, records, profile, thumbnails))
