"""Each figure's smallest text, in image pixels, recorded in its PNG for the site check.

A figure scaled down on the page shrinks its text with it. ``scripts/check_site.mjs`` fails a
figure whose smallest text is under 9 px on screen at a desktop width: rendered width / natural
width × the smallest text size in image pixels. That size is known only where the figure is
drawn, so every figure script saves through :func:`save` (or, for a figure saved by library code
such as ``toyvae.snr.plot_snr``, inside :func:`recording`), which writes it into the PNG as a
tEXt chunk (keyword :data:`KEY`, value in pixels): the record travels with the image.

The size is each visible, non-empty ``Text`` artist's font size in points × dpi / 72, the
smallest over the figure (titles, labels, tick labels, legend entries, annotations). Mathtext
sub- and superscripts are drawn at about 0.7 of their artist's size and are not counted apart.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.text import Text

KEY = "Smallest text (px)"  # the tEXt keyword scripts/check_site.mjs reads


def smallest_text_px(fig: Figure, dpi: float) -> float:
    """The smallest font size of any visible text in ``fig``, in pixels of an image at ``dpi``."""
    fig.draw_without_rendering()  # tick labels and legends get their text when drawn
    sizes = [
        text.get_fontsize()
        for text in fig.findobj(Text)
        if text.get_visible() and text.get_text().strip()
    ]
    if not sizes:
        raise ValueError("the figure has no text")
    return min(sizes) * dpi / 72


def png_metadata(fig: Figure, dpi: float, extra: dict | None = None) -> dict:
    """PNG metadata for ``savefig``: the smallest text size, and no version stamp."""
    # Matplotlib stamps its version as "Software"; dropped so that reruns give identical files.
    return {"Software": None, **(extra or {}), KEY: f"{smallest_text_px(fig, dpi):.2f}"}


def save(fig: Figure, path: Path | str, dpi: float) -> None:
    """``fig.savefig(path, dpi=dpi)`` as a PNG that records its smallest text size."""
    fig.savefig(path, dpi=dpi, metadata=png_metadata(fig, dpi))


@contextmanager
def recording():
    """While active, every ``Figure.savefig`` records the figure's smallest text size.

    For figures that library code draws and saves itself (``toyvae.snr.plot_snr``).
    """
    original = Figure.savefig

    def savefig(self, fname, *args, dpi=None, metadata=None, **kwargs):
        resolution = rcParams["savefig.dpi"] if dpi is None else dpi
        resolution = self.dpi if resolution == "figure" else resolution
        metadata = png_metadata(self, resolution, metadata)
        return original(self, fname, *args, dpi=dpi, metadata=metadata, **kwargs)

    Figure.savefig = savefig
    try:
        yield
    finally:
        Figure.savefig = original
