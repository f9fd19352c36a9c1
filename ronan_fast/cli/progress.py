"""Progress on the terminal: one bar of images with an ETA (:class:`ronan_fast.progress.ImageProgress`)."""

from __future__ import annotations

from ronan_fast.progress import ImageProgress


class Progress(ImageProgress):
    """The command's bar; nothing when ``quiet`` or stderr is not a terminal."""

    def __init__(self, quiet: bool, total: int, desc: str = "images"):
        super().__init__(total, desc, enabled=False if quiet else None)
