"""The HTML report: escaping, number formats and bad input here; sorting, filtering, the histogram
and the absence of injected or external content in a real headless Chromium.

The browser tests skip (saying why) when no Chromium is found; ``bash run.sh test`` installs it.
Set RONAN_FAST_CHROMIUM to use another Chromium-like browser binary.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ronan_fast.reports import SORT_KEYS, png_bytes, render_html, write_html
from ronan_fast.reports.html import _fmt_p, _plain

# ----------------------------------------------------------------------------- a report to show

HOSTILE_PATHS = [
    "<script>alert(1)</script>.png",
    "x\"><img src=x onerror=\"document.title='pwned'\">.png",
    "it's \"quoted\" & <b>bold</b>.png",
    "naïve café 猫.png",
    "bad\udcff\udc80name.png",
    "{{js}} {{tbody}}.png",
    "tab\there\nnewline\x00nul\u202eevil.png",
    "photos/Cat_01.png",
    "photos/cat_02.png",
]
THRESHOLD = math.exp(-1.0 + 2.5 * 0.4)


def make_header(**changes) -> dict:
    header = {
        "format": "ronan-fast report", "format_version": 1, "tool": "ronan-fast", "version": "0.2.0",
        "created": "2026-12-05T07:00:00+00:00",
        "model": {"name": "default (DCGAN, Fashion-MNIST)", "fingerprint": "f" * 64},
        "reference": {"name": "reference (DCGAN, MNIST digits)", "fingerprint": "e" * 64},
        "profile": {"id": "0123456789abcdef", "n": 12, "mu": -1.0, "sigma": 0.4, "rule": "grubbs-log",
                    "edit": None, "generator_name": "default (DCGAN, Fashion-MNIST)"},
        "rule": "grubbs-log", "alpha": 0.05, "critical_value": 2.5, "threshold": THRESHOLD,
        "settings": {"steps": 300, "lr": 0.1, "metric": "mse", "polish": False},
        "seed": 0, "early_stop": True, "device": "cpu",
    }
    header.update(changes)
    return header


def scored(path: str, calibrated: float, *, p: float = 0.3, notes: str = "") -> dict:
    g = (math.log(calibrated) + 1.0) / 0.4
    return {"path": path, "verdict": "belongs" if g < 2.5 else "does not belong", "belongs": g < 2.5,
            "loss": calibrated * 0.02, "reference_loss": 0.02, "calibrated_loss": calibrated, "statistic": g,
            "critical_value": 2.5, "p_value": p, "threshold": THRESHOLD, "alpha": 0.05, "rule": "grubbs-log",
            "stopped_early": g < 0, "row_steps": 300, "notes": notes, "error": None, "profile_id": "0123456789abcdef"}


def make_records() -> list[dict]:
    losses = [0.31, 2.9, 0.12, 1.7, 0.45, 0.27, 5.5, 0.2, 0.33]
    recs = [scored(p, a) for p, a in zip(HOSTILE_PATHS, losses)]
    recs[1]["p_value"] = 0.0  # underflowed
    recs[6]["p_value"] = 3.2e-310
    recs.append({"path": "missing <file>.png", "verdict": "error", "belongs": None, "error": "file not found"})
    recs.append(scored("no-loss.png", 0.3) | {"calibrated_loss": None, "statistic": None, "p_value": None,
                                               "loss": None, "notes": "inversion diverged"})
    return recs


def make_profile() -> dict:
    losses = [math.exp(-1.0 + 0.4 * z) for z in (-1.6, -1.0, -0.7, -0.4, -0.2, 0.0, 0.1, 0.3, 0.5, 0.8, 1.1, 1.5)]
    return {"rule": "grubbs-log", "n": 12, "mu": -1.0, "sigma": 0.4, "threshold": THRESHOLD,
            "calibrated_losses": losses}


def make_thumbnails(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {i: {"image": png_bytes(torch.rand(1, 28, 28, generator=g)),
                "model": png_bytes(torch.rand(1, 28, 28, generator=g)),
                "reference": None if i % 3 == 0 else png_bytes(torch.rand(3, 16, 24, generator=g))}
            for i in range(n) if i != 2}


# ----------------------------------------------------------------------------- a small DOM


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None):
        self.tag, self.attrs, self.parent, self.children, self.text_parts = tag, attrs, parent, [], []

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.attrs.get("class", "").split())]

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"{len(found)} elements with id {ident!r}"
        return found[0]

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)


class TreeBuilder(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse(page: str) -> Node:
    b = TreeBuilder()
    b.feed(page)
    b.close()
    return b.root


def body_rows(dom: Node) -> list[Node]:
    return dom.by_id("records").find_all("tbody")[0].find_all("tr")


# ----------------------------------------------------------------------------- without a browser


def test_page_is_one_offline_file_with_every_record():
    recs = make_records()
    page = render_html(make_header(), recs, make_profile(), make_thumbnails(len(recs)))
    page.encode("utf-8")  # no lone surrogate left in the page
    assert "http:" not in page and "https:" not in page
    dom = parse(page)
    assert not dom.find_all("link") and not dom.find_all("iframe") and not dom.find_all("object")
    assert len(dom.find_all("script")) == 1 and len(dom.find_all("style")) == 1
    rows = body_rows(dom)
    assert [r.attrs["data-index"] for r in rows] == [str(i) for i in range(len(recs))]
    for r, rec in zip(rows, recs):
        assert r.find_all("td", "path")[0].text == _plain(rec["path"])
        assert r.attrs["data-verdict"] == rec["verdict"]
    assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in dom.find_all("img"))
    thumbs = make_thumbnails(len(recs))
    assert len(dom.find_all("img")) == sum(v is not None for t in thumbs.values() for v in t.values())
    assert tuple(th.attrs["data-key"] for th in dom.find_all("th") if "data-key" in th.attrs) == SORT_KEYS
    csp = [m for m in dom.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0].attrs["content"]


def test_paths_that_cannot_be_shown_are_escaped_visibly():
    assert _plain("bad\udcff.png") == "bad\\xff.png"  # the undecodable byte 0xff
    assert _plain("a\ud800b") == "a\\ud800b"
    assert _plain("x\u202egnp.exe") == "x\\u202egnp.exe"  # right-to-left override
    assert _plain("a\tb\nc\x00") == "a\\tb\\nc\\x00"
    assert _plain("naïve 猫") == "naïve 猫"
    page = render_html(make_header(), [scored("bad\udcff.png", 0.3)], make_profile())
    dom = parse(page)
    cell = body_rows(dom)[0].find_all("td", "path")[0]
    assert cell.text == "bad\\xff.png"
    assert cell.find_all("span", "esc")[0].text == "\\xff"


def test_p_values_are_never_printed_as_zero():
    assert _fmt_p(0.0) == "< 1e-300"
    assert _fmt_p(3.2e-310) == "3.20e-310"
    assert _fmt_p(2.5e-5) == "2.50e-05"
    assert _fmt_p(0.0123) == "0.0123"
    assert _fmt_p(0.99996) == "> 0.999"
    assert _fmt_p(1.0) == "1"
    assert _fmt_p(None) == "—"
    recs = make_records()
    dom = parse(render_html(make_header(), recs, make_profile()))
    p_col = [th.attrs["data-key"] for th in dom.find_all("th") if "data-key" in th.attrs].index("p_value")
    shown = [[c for c in r.children if isinstance(c, Node)][p_col].text for r in body_rows(dom)]
    assert shown[1] == "< 1e-300" and shown[6] == "3.20e-310"
    assert not any(s.strip() in ("0", "0.0", "0.00") for s in shown)


def test_histogram_has_a_marker_per_scored_image_and_the_threshold():
    recs = make_records()
    dom = parse(render_html(make_header(), recs, make_profile()))
    svg = dom.by_id("histogram")
    markers = svg.find_all(cls="marker")
    with_loss = [i for i, r in enumerate(recs) if r["verdict"] != "error" and r["calibrated_loss"] is not None]
    assert [int(m.attrs["data-index"]) for m in markers] == with_loss
    for m in markers:
        verdict = recs[int(m.attrs["data-index"])]["verdict"]
        assert ("belongs" if verdict == "belongs" else "not-belongs") in m.attrs["class"].split()
    (line,) = svg.find_all("line", "threshold")
    assert float(line.attrs["data-value"]) == pytest.approx(THRESHOLD)
    assert len(svg.find_all("rect", "bar")) >= 3
    assert "1 image(s) without a calibrated loss are not marked" in dom.by_id("profile").text


def test_markers_sit_left_of_the_threshold_exactly_when_images_belong():
    recs = make_records()
    svg = parse(render_html(make_header(), recs, make_profile())).by_id("histogram")
    xt = float(svg.find_all("line", "threshold")[0].attrs["x1"])
    for m in svg.find_all(cls="marker"):
        x = float(m.attrs["cx"]) if m.tag == "circle" else float(m.attrs["d"][1:].split(",")[0])
        assert (x < xt) == (recs[int(m.attrs["data-index"])]["verdict"] == "belongs")


def test_linear_axis_for_grubbs_and_uncalibrated_reports():
    prof = {"rule": "grubbs", "n": 5, "mu": 0.02, "sigma": 0.005, "threshold": 0.03,
            "calibrated_losses": [0.015, 0.018, 0.02, 0.022, 0.025]}
    rec = scored("a.png", 0.5) | {"calibrated_loss": 0.04, "reference_loss": None, "rule": "grubbs",
                                  "verdict": "does not belong", "belongs": False}
    header = make_header(rule="grubbs", reference=None)
    dom = parse(render_html(header, [rec], prof))
    assert "log scale" not in dom.by_id("histogram").text
    assert "uncalibrated" in dom.by_id("run").text
    ticks = [t.text for t in dom.by_id("histogram").find_all("g", "ticks")[0].find_all("text")]
    assert ticks == ["0.015", "0.02", "0.025", "0.03", "0.035", "0.04"]
    tiny = prof | {"calibrated_losses": [v * 1e-12 for v in prof["calibrated_losses"]], "threshold": 3e-14,
                   "mu": 2e-14, "sigma": 5e-15}
    dom = parse(render_html(header, [rec | {"calibrated_loss": 4e-14}], tiny))
    ticks = [t.text for t in dom.by_id("histogram").find_all("g", "ticks")[0].find_all("text")]
    assert len(ticks) >= 4 and len(set(ticks)) == len(ticks) and "0" not in ticks, ticks


def test_a_belonging_profile_object_is_taken_as_the_profile():
    from ronan_fast.profile import BelongingProfile

    prof = BelongingProfile.from_losses(make_profile()["calibrated_losses"], rule="grubbs-log")
    dom = parse(render_html(make_header(profile=make_header()["profile"] | {"n": prof.n}), make_records(), prof))
    svg = dom.by_id("histogram")
    assert float(svg.find_all("line", "threshold")[0].attrs["data-value"]) == pytest.approx(prof.threshold)
    assert sum(int(b.find_all("title")[0].text.split()[0]) for b in svg.find_all("rect", "bar")) == prof.n


def test_bad_input_is_named():
    recs, prof, header = make_records(), make_profile(), make_header()
    with pytest.raises(ValueError, match=r"records\[3\]\['loss'\] must be a number"):
        render_html(header, recs[:3] + [recs[3] | {"loss": "0.1"}], prof)
    with pytest.raises(ValueError, match=r"records\[0\]\['verdict'\]"):
        render_html(header, [recs[0] | {"verdict": "maybe"}], prof)
    with pytest.raises(ValueError, match=r"records\[0\]\['belongs'\]"):
        render_html(header, [recs[0] | {"belongs": "yes"}], prof)
    with pytest.raises(TypeError, match="records must be a list"):
        render_html(header, recs[0], prof)
    with pytest.raises(ValueError, match=r"thumbnails\[0\]\['image'\] is not a PNG"):
        render_html(header, recs, prof, {0: {"image": b"GIF89a" + bytes(40)}})
    with pytest.raises(ValueError, match=r"thumbnails key 99"):
        render_html(header, recs, prof, {99: {"image": None}})
    with pytest.raises(ValueError, match=r"thumbnails\[0\] has key 'recon'"):
        render_html(header, recs, prof, {0: {"recon": None}})
    with pytest.raises(ValueError, match="profile lacks threshold"):
        render_html(header, recs, {k: v for k, v in prof.items() if k != "threshold"})
    with pytest.raises(ValueError, match=r"profile\['calibrated_losses'\]\[1\]"):
        render_html(header, recs, prof | {"calibrated_losses": [0.1, float("nan")]})
    with pytest.raises(ValueError, match=r"header\['rule'\] is 'grubbs' but profile\['rule'\] is 'grubbs-log'"):
        render_html(make_header(rule="grubbs"), recs, prof)
    with pytest.raises(ValueError, match=r"header\['model'\]\['name'\]"):
        render_html(make_header(model={"name": 3, "fingerprint": "x"}), recs, prof)
    with pytest.raises(ValueError, match="must end in .html"):
        write_html("report.json", header, recs, prof)
    with pytest.raises(ValueError, match="image must be float"):
        png_bytes(torch.zeros(1, 4, 4, dtype=torch.uint8))


def test_a_profile_that_can_hardly_tell_is_named_in_the_run_and_the_summary():
    """The header's profile warning is shown in red under the threshold and the summary line; a
    report that does not record one gets the warning its calibrated threshold calls for (A' >= 0.2),
    an uncalibrated one none, and a recorded null means none."""
    recs, prof = make_records(), make_profile()
    strong = prof | {"mu": -6.0, "threshold": math.exp(-6.0 + 2.5 * 0.4)}
    said = "the profile's threshold is A' < 1: recorded by the writer"

    def warnings_of(header, profile):
        dom = parse(render_html(header, recs, profile))
        return ([n.text for n in dom.by_id("run").find_all("span", "warning")],
                [n.text for n in dom.by_id("summary").find_all("span", "warning")])

    recorded = make_header(profile=make_header()["profile"] | {"warning": said})
    run, summary = warnings_of(recorded, prof)
    assert run == [said] and len(summary) == 1 and "hardly tell" in summary[0]
    run, summary = warnings_of(make_header(), prof)  # none recorded: the threshold 1.0 calls for it
    assert len(run) == 1 and "hardly tell the model's images from others" in run[0] and len(summary) == 1
    assert warnings_of(make_header(), strong) == ([], [])  # threshold 0.0067
    assert warnings_of(make_header(reference=None), prof) == ([], [])  # uncalibrated: no anchor
    assert warnings_of(make_header(profile=make_header()["profile"] | {"warning": None}), prof) == ([], [])
    with pytest.raises(ValueError, match=r"header\['profile'\]\['warning'\]"):
        render_html(make_header(profile=make_header()["profile"] | {"warning": 3}), recs, prof)


def test_write_html_is_atomic_and_readable(tmp_path):
    out = write_html(tmp_path / "sub" / "report.html", make_header(), make_records(), make_profile())
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_missing_header_fields_are_shown_as_not_recorded():
    dom = parse(render_html({}, make_records()[:2], make_profile()))
    assert "not recorded" in dom.by_id("run").text


def test_png_bytes_round_trips():
    from io import BytesIO

    from PIL import Image

    x = torch.linspace(0, 1, 12).reshape(1, 3, 4)
    with Image.open(BytesIO(png_bytes(x))) as im:
        assert im.size == (4, 3) and im.mode == "L"
        assert np.asarray(im)[-1, -1] == 255 and np.asarray(im)[0, 0] == 0
    with Image.open(BytesIO(png_bytes(torch.zeros(3, 5, 7).numpy()))) as im:
        assert im.size == (7, 5) and im.mode == "RGB"


# any code point (lone surrogates included), with markup-like pieces mixed in
text_with_anything = st.lists(
    st.one_of(st.characters(codec=None, exclude_categories=()),
              st.sampled_from(["<", ">", "&", '"', "'", "<b>", "</td>", "<script>", "&amp;", "&#60;", "{{js}}",
                               "\udcff", "\x00", "\r\n", "\u202e", "-->", "<!--"])),
    max_size=20,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=text_with_anything, notes=text_with_anything, name=text_with_anything)
def test_any_text_is_shown_escaped_and_never_becomes_markup(path, notes, name):
    rec = scored(path, 0.3, notes=notes)
    page = render_html(make_header(model={"name": name, "fingerprint": "ab"}), [rec], make_profile())
    page.encode("utf-8")
    dom = parse(page)
    (row,) = body_rows(dom)
    assert row.find_all("td", "path")[0].text == _plain(path)
    assert row.find_all("td", "notes")[0].text == _plain(notes, keep_lines=True)
    assert len(dom.find_all("script")) == 1
    allowed = {"#document", "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "strong",
               "section", "dl", "dt", "dd", "code", "span", "details", "summary", "table", "tr", "th", "td",
               "svg", "title", "rect", "text", "line", "g", "circle", "path", "ul", "li", "div", "label", "select",
               "option", "input", "thead", "tbody", "footer", "script"}
    assert {n.tag for n in dom.iter()} <= allowed


# ----------------------------------------------------------------------------- in a browser


def find_chromium() -> str | None:
    given = os.environ.get("RONAN_FAST_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (apt-get install chromium, or set RONAN_FAST_CHROMIUM); bash run.sh test installs it",
)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="ronan-chromium-") as profile_dir:
        done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    recs = make_records()
    return write_html(tmp_path_factory.mktemp("html") / "report.html", make_header(), recs, make_profile(),
                      make_thumbnails(len(recs)))


def browser_dom(report_file: Path, fragment: str = "") -> Node:
    dom = parse(chromium("--dump-dom", report_file.as_uri() + fragment))
    assert dom.find_all("html")[0].attrs.get("data-ready") == "true", "the page's script did not run"
    return dom


def shown(dom: Node) -> list[int]:
    return [int(r.attrs["data-index"]) for r in body_rows(dom) if "hidden" not in r.attrs]


@needs_chromium
def test_browser_shows_every_record_and_injects_nothing(report_file):
    recs = make_records()
    dom = browser_dom(report_file)
    assert shown(dom) == list(range(len(recs)))
    assert dom.by_id("shown-count").text == f"{len(recs)} of {len(recs)} images shown"
    for row in body_rows(dom):
        rec = recs[int(row.attrs["data-index"])]
        assert row.find_all("td", "path")[0].text == _plain(rec["path"])
    assert dom.find_all("title")[0].text.startswith("ronan-fast report")  # the onerror did not run
    assert len(dom.find_all("script")) == 1
    assert not dom.find_all("b")
    imgs = dom.find_all("img")
    assert imgs and all(i.parent.tag == "figure" and set(i.attrs) == {"src", "alt", "width", "height"} for i in imgs)
    assert not [n for n in dom.iter() if any(k.startswith("on") for k in n.attrs)]
    error_row = body_rows(dom)[9]
    assert error_row.attrs["data-verdict"] == "error" and "file not found" in error_row.text


@needs_chromium
def test_browser_page_references_nothing_outside_itself(report_file):
    dom = browser_dom(report_file)
    for node in dom.iter():
        for attr in ("src", "href", "xlink:href", "action", "data", "poster", "srcset"):
            value = node.attrs.get(attr, "").strip().lower()
            assert not value.startswith(("http:", "https:", "//", "ftp:", "file:")), (node.tag, attr, value)
            if value:
                assert value.startswith("data:"), (node.tag, attr, value)
    style = dom.find_all("style")[0].text
    assert "url(" not in style and "@import" not in style
    assert not dom.find_all("link")


@needs_chromium
@pytest.mark.parametrize("key,order", [("calibrated_loss", "desc"), ("calibrated_loss", "asc"), ("path", "asc"),
                                       ("p_value", "asc"), ("verdict", "desc")])
def test_browser_sorts_from_the_fragment(report_file, key, order):
    recs = make_records()
    dom = browser_dom(report_file, f"#sort={key}&order={order}")
    present = [i for i, r in enumerate(recs) if r.get(key) is not None]
    missing = [i for i, r in enumerate(recs) if r.get(key) is None]

    def k(i):
        v = recs[i][key]
        return _plain(v).lower() if isinstance(v, str) else v

    expected = sorted(present, key=lambda i: (k(i), i))
    if order == "desc":  # ties stay in report order
        expected = sorted(present, key=lambda i: (k(i), -i), reverse=True)
    got = shown(dom)
    assert got[len(present):] == missing  # missing values last, in report order
    if key == "path":  # the browser's locale collation may order punctuation differently: check a clear case
        assert got.index(7) < got.index(8) and got.index(3) < got.index(7)
    else:
        assert got[:len(present)] == expected
    th = [t for t in dom.find_all("th") if t.attrs.get("data-key") == key][0]
    assert th.attrs["aria-sort"] == ("descending" if order == "desc" else "ascending")


@needs_chromium
def test_browser_filters_from_the_fragment(report_file):
    recs = make_records()
    dom = browser_dom(report_file, "#verdict=belongs")
    assert shown(dom) == [i for i, r in enumerate(recs) if r["verdict"] == "belongs"]
    hidden_markers = {int(m.attrs["data-index"]) for m in dom.find_all(cls="marker") if "dim" in m.attrs["class"]}
    assert hidden_markers == {i for i, r in enumerate(recs) if r["verdict"] == "does not belong"}

    dom = browser_dom(report_file, "#verdict=does+not+belong&sort=calibrated_loss&order=desc")
    assert shown(dom) == [6, 1, 3]

    dom = browser_dom(report_file, "#q=CAT_0")
    assert shown(dom) == [7, 8]
    assert dom.by_id("shown-count").text == f"2 of {len(recs)} images shown"
    assert dom.by_id("filter-q").attrs.get("value", "") in ("", "CAT_0")  # the box's value is a property

    dom = browser_dom(report_file, "#verdict=error")
    assert shown(dom) == [9]

    dom = browser_dom(report_file, "#q=" + "%3Cscript%3E")
    assert shown(dom) == [0]


@needs_chromium
def test_browser_histogram_marks_every_scored_image(report_file):
    recs = make_records()
    dom = browser_dom(report_file)
    svg = dom.by_id("histogram")
    markers = svg.find_all(cls="marker")
    assert sorted(int(m.attrs["data-index"]) for m in markers) == [
        i for i, r in enumerate(recs) if r["verdict"] != "error" and r["calibrated_loss"] is not None]
    assert len(svg.find_all("line", "threshold")) == 1


@needs_chromium
def test_browser_renders_a_screenshot(report_file, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", report_file.as_uri())
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        assert len(np.unique(np.asarray(im.convert("L").resize((60, 45))))) > 5  # not a blank page
