"""``ronan-fast report``: a finished report (or a log) as an HTML page or in another format."""

from __future__ import annotations

from pathlib import Path

from ronan_fast.cli.common import (
    EXIT_CODES_TEXT,
    EXIT_OK,
    UsageError,
    check_output,
    para,
    positive_int,
    setup_logging,
)
from ronan_fast.reports.files import SUFFIXES

#: thumbnails of the images themselves (read from their files) in the page, at most (default)
THUMBNAILS = 500


def add_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "report", formatter_class=fmt,
        help="turn a report or a log of 'inspect' into an HTML page or another format",
        description=para(
            "Read a report written by 'ronan-fast inspect' (.jsonl, .json or .csv; a log still being written "
            "or left by an interrupted run too) and write it as a self-contained HTML page (--html) or in another "
            "format (-o). The page shows each image read from its file where it can still be read; the "
            "reconstructions are shown only by 'inspect --html', which has them."),
        epilog=(
            "examples:\n"
            "  ronan-fast report report.jsonl --html report.html\n"
            "  ronan-fast report report.csv -o report.json\n\n" + EXIT_CODES_TEXT
        ),
    )
    p.add_argument("source", metavar="REPORT", help="a report or log: .jsonl, .json or .csv")
    p.add_argument("--html", metavar="REPORT.html", help="write the HTML page here")
    p.add_argument("-o", "--output", metavar="REPORT", help="write the report here in the format its suffix names")
    p.add_argument("--thumbnails", type=positive_int, default=THUMBNAILS, metavar="N",
                   help=f"images shown in the page, read from their files, at most (default: {THUMBNAILS})")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="what ronan_fast logs on stderr (default: warning)")


def run(args) -> int:
    from ronan_fast.reports.files import ReportLock, read_report, write_report

    setup_logging(args.log_level)
    if args.html is None and args.output is None:
        raise UsageError("give --html REPORT.html and/or -o REPORT: nothing to write")
    html = check_output(args.html, "--html", (".html", ".htm"))
    output = check_output(args.output, "-o", SUFFIXES)
    source = Path(args.source)
    if output is not None and output.resolve() == source.resolve():
        raise UsageError(f"-o {output}: is the report being read; choose another file")
    header, records = read_report(source)
    if output is not None:
        with ReportLock(output):
            write_report(output, header, records)
    if html is not None:
        from ronan_fast.reports.html import write_html

        profile = {**header["profile"], "threshold": header["threshold"]}
        write_html(html, header, records, profile, _image_thumbnails(records, header, args.thumbnails))
    for label, path in (("report", output), ("html", html)):
        if path is not None:
            print(f"{label}: {path}")
    return EXIT_OK


def _image_thumbnails(records: list[dict], header: dict, limit: int) -> dict[int, dict]:
    """Each judged image read from its file (64x64 colour), where it can still be read, at most ``limit``."""
    from ronan_fast.imageio import ImageLoadError, load_at_shapes
    from ronan_fast.reports.html import png_bytes

    thumbs: dict[int, dict] = {}
    for i, r in enumerate(records):
        if len(thumbs) >= limit:
            break
        if r.get("error"):
            continue
        try:
            image = load_at_shapes(r["path"], [(3, 64, 64)]).images[0]
        except (ImageLoadError, OSError, ValueError):
            continue
        thumbs[i] = {"image": png_bytes(image), "model": None, "reference": None}
    return thumbs
