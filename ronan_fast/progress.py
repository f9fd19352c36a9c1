"""Progress with an ETA for people: one bar per job, counting images.

The attributor reports ``progress(stage, done, total)`` per inversion stage ("generate",
"reference", "model", "model, again (k)"); inversions report images as they get done (see
:func:`~ronan_fast.inversion.invert`). :class:`ImageProgress` turns that into one bar of images
with its rate and time left, on stderr, whatever the stages: with a reference model an image
is half done once the reference has inverted it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["ImageProgress", "ProgressFn"]

#: ``progress(stage, done, total)``: stage is "generate", "reference" or "model" (or "model,
#: again (k)" for a profile's retries); counts are images
ProgressFn = Callable[[str, float, int], None]


class ImageProgress:
    """A bar of ``total`` images on stderr (tqdm), with its rate and ETA.

    :meth:`part` gives the ``progress`` callback for a call that counts images from ``offset``,
    each going through the inversion ``stages`` ("reference" then "model", or "model" alone):
    the bar shows the images done, averaged over the stages. Other stages (generating images, a
    profile's retries) show by name without moving it. ``enabled=None``: on when stderr is a
    terminal.
    """

    def __init__(self, total: int, desc: str = "images", enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.desc = total, desc
        self._bar = None
        self._done: dict[str, float] = {}

    def part(self, offset: int = 0, stages: tuple[str, ...] = ("reference", "model")) -> ProgressFn:
        def report(stage: str, done: float, total: int) -> None:
            if stage in stages:
                self._done[stage] = offset + done
                self._show(sum(self._done.get(st, offset) for st in stages) / len(stages), stage)
            else:
                self._show(None, stage)

        return report

    def _show(self, n: float | None, stage: str) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="img", file=sys.stderr, leave=False,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, "
                                        "{rate_fmt}{postfix}]")
        if n is not None:
            self._bar.n = min(float(n), self.total)
        self._bar.set_postfix_str(stage, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
