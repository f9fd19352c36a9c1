"""Text and numbers as a report page shows them: unsafe characters as visible escapes, HTML
escaping, numbers and p-values for people, sort keys for the page's script."""

from __future__ import annotations

import html
import math
import re

# Characters written as visible escapes: lone surrogates, C0/C1 controls and DEL, bidirectional
# controls, and the non-characters U+FFFE/U+FFFF.
_OTHER_UNSAFE = "\ud800-\udfff\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ufffe\uffff"
_UNSAFE = re.compile(f"[\x00-\x1f{_OTHER_UNSAFE}]")
_UNSAFE_KEEP_LINES = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")  # keeps tabs and newlines
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(ch: str) -> str:
    c = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the undecodable byte c - 0xDC00
        return f"\\x{c - 0xDC00:02x}"
    if c < 0x80:
        return f"\\x{c:02x}"
    return f"\\u{c:04x}"


def _plain(text: str, keep_lines: bool = False) -> str:
    """``text`` with unsafe characters replaced by visible escapes (no HTML escaping)."""
    pattern = _UNSAFE_KEEP_LINES if keep_lines else _UNSAFE
    return pattern.sub(lambda m: _escape_char(m.group()), text)


def _attr(text: str) -> str:
    """``text`` for an HTML attribute value (quoted with double quotes)."""
    return html.escape(_plain(text), quote=True)


def _html(text: str, keep_lines: bool = False) -> str:
    """``text`` as HTML: escaped, unsafe characters as visible escapes marked ``<span class="esc">``."""
    pattern = _UNSAFE_KEEP_LINES if keep_lines else _UNSAFE
    out, last = [], 0
    for m in pattern.finditer(text):
        out.append(html.escape(text[last:m.start()], quote=False))
        esc = _escape_char(m.group())
        out.append(f'<span class="esc" title="{_ESC_TITLE}">{html.escape(esc)}</span>')
        last = m.end()
    out.append(html.escape(text[last:], quote=False))
    return "".join(out)


_ESC_TITLE = "a character shown escaped: \\xNN is a byte that is not UTF-8 or a control character"


# ----------------------------------------------------------------------------- numbers


def _fmt(x: float | None, spec: str = ".4g") -> str:
    """A number for people; "—" for a missing one."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _fmt_p(p: float | None) -> str:
    """A p-value for people: never "0" (an underflowed p is "< 1e-300"), tiny ones in scientific notation."""
    if p is None or math.isnan(p):
        return "—"
    if p <= 0:
        return "< 1e-300"
    if p < 1e-3:
        return f"{p:.2e}"
    text = f"{p:.3g}"
    return "> 0.999" if p < 1 and float(text) >= 1 else text


def _data_value(x: float | None) -> str:
    """A number as the ``data-v`` sort key the page's script reads ("" for missing)."""
    if x is None or math.isnan(x):
        return ""
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(float(x))
