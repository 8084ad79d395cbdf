"""Images of a scan: the virtual bright field (events inside the bright-field disk, per scan
position), and PNG files drawn by matplotlib: raw grey pixels (``write_png``), or figures a person
can read (``write_figure``: enlarged without smoothing, axes in scan positions, a colour bar)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_output
from .disk import disk_mask, estimate_disk, summed_pattern
from .frames import EventsInput, as_events, check_frame_shape, position_pairs, scan_size


class VirtualBrightField:
    """Accumulates a virtual bright-field image (events inside a disk, per scan position) from
    frames given one at a time or in blocks, so it can ride along with a merge."""

    def __init__(
        self,
        scan_width: int,
        scan_height: int,
        frame_shape: Sequence[int],
        center: Sequence[float],
        radius: float,
    ):
        self.scan_width, self.scan_height = int(scan_width), int(scan_height)
        self._n = scan_size(scan_width, scan_height)
        self.frame_shape = check_frame_shape(frame_shape)
        self.center = (float(center[0]), float(center[1]))
        self.radius = float(radius)
        self._mask = disk_mask(self.frame_shape, self.center, self.radius).ravel()
        self._counts = np.zeros(self._n, dtype=np.int64)

    def add(self, position: int, events: np.ndarray) -> None:
        position = int(position)
        if not 0 <= position < self._n:
            raise ValueError(f"scan position {position} outside a {self._n}-position scan")
        arr = as_events(events, self._mask.size, f"scan position {position}")
        self._counts[position] += int(np.count_nonzero(self._mask[arr]))

    def add_block(
        self, positions: np.ndarray, flat_events: np.ndarray, offsets: np.ndarray
    ) -> None:
        """Frames ``i`` = ``flat_events[offsets[i]:offsets[i+1]]`` at ``positions[i]``."""
        inside = np.concatenate([[0], np.cumsum(self._mask[flat_events], dtype=np.int64)])
        offsets = np.asarray(offsets, dtype=np.int64)
        per_frame = inside[offsets[1:]] - inside[offsets[:-1]]
        np.add.at(self._counts, np.asarray(positions, np.int64), per_frame)

    @property
    def image(self) -> np.ndarray:
        """Counts inside the disk, shape (scan_height, scan_width)."""
        return self._counts.reshape(self.scan_height, self.scan_width).copy()


def virtual_bright_field(
    events: EventsInput,
    scan_width: int,
    scan_height: int,
    frame_shape: Sequence[int],
    center: Sequence[float] | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """Image (scan_height, scan_width) of events inside the bright-field disk per position.

    ``events`` is a sequence indexed by position, a mapping position -> events, or an iterable
    of (position, events). Without ``center``/``radius`` the disk is estimated from the summed
    pattern (``estimate_disk``), which needs two passes, so a one-shot iterator is buffered.
    """
    pairs: Iterable[tuple[int, np.ndarray]] = position_pairs(events)
    if center is None or radius is None:
        pairs = list(pairs)  # two passes: for a sequence this is a list of references only
        disk = estimate_disk(summed_pattern(iter(pairs), frame_shape))
        center = disk.center if center is None else center
        radius = disk.radius if radius is None else radius
    acc = VirtualBrightField(scan_width, scan_height, frame_shape, center, radius)
    for position, ev in pairs:
        acc.add(position, ev)
    return acc.image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale an image's finite min..max linearly to 0..255 (rounded); a constant image and
    non-finite pixels become 0."""
    a = np.asarray(image)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"image must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    out = np.zeros(a.shape, np.uint8)
    if not finite.any():
        return out
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi > lo:
        scaled = np.rint((a[finite] - lo) * (255.0 / (hi - lo)))
        out[finite] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def write_png(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> np.ndarray:
    """Write ``image`` as an 8-bit grey PNG scaled by ``to_uint8``, atomically. Returns the
    pixels written."""
    # Imported here: 32 MiB and 0.3 s that distributors, which never draw, should not pay.
    import matplotlib.image

    pixels = to_uint8(image)
    # Grey as explicit RGBA bytes: a colormap would round some levels one step down.
    rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
    with atomic_output(path, overwrite=overwrite) as tmp:
        matplotlib.image.imsave(tmp, rgba, format="png")
    return pixels


# A figure's geometry in PNG pixels: each image is enlarged by a whole factor until its longer side
# reaches FIGURE_TARGET_PX (one scan position = scale x scale PNG pixels), with room for labels.
FIGURE_TARGET_PX = 480
FIGURE_DPI = 100
_LEFT, _TOP, _BOTTOM, _MIN_PLOT_H = 80, 40, 60, 160
_CBAR_GAP, _CBAR_W, _CBAR_LABELS = 14, 18, 86
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in PNG pixels from the top-left, end exclusive


@dataclass(frozen=True)
class Panel:
    """One image of a figure: its values (NaN: not measured yet), title, axis labels, colour-bar
    label, colormap, whether the colour scale is logarithmic, and whether it is symmetric about 0
    (a signed quantity on a diverging colormap)."""

    image: np.ndarray
    title: str
    xlabel: str = "scan x (position)"
    ylabel: str = "scan y (position)"
    unit: str = "electrons"
    cmap: str = "gray"
    log: bool = False
    symmetric: bool = False


@dataclass(frozen=True)
class FigureLayout:
    """Where a figure's parts land: PNG ``size`` (width, height), and per panel the image box and
    the colour-bar box, with ``scale`` PNG pixels per image pixel."""

    size: tuple[int, int]
    scale: int
    images: tuple[Box, ...]
    colorbars: tuple[Box, ...]


def figure_layout(shapes: Sequence[Sequence[int]]) -> FigureLayout:
    """The layout of panels of image shapes ``(rows, cols)`` side by side."""
    if not shapes:
        raise ValueError("a figure needs at least one image")
    scale = max(1, FIGURE_TARGET_PX // max(max(int(r), int(c)) for r, c in shapes))
    plot_h = max(_MIN_PLOT_H, max(int(r) for r, _ in shapes) * scale)
    images, bars, x = [], [], 0
    for rows, cols in shapes:
        x0 = x + _LEFT
        images.append((x0, _TOP, x0 + int(cols) * scale, _TOP + int(rows) * scale))
        bx = x0 + int(cols) * scale + _CBAR_GAP
        bars.append((bx, _TOP, bx + _CBAR_W, _TOP + plot_h))
        x = bx + _CBAR_W + _CBAR_LABELS
    return FigureLayout((x, _TOP + plot_h + _BOTTOM), scale, tuple(images), tuple(bars))


def _norm(panel: Panel, values: np.ndarray):
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values)]
    if panel.log:
        positive = finite[finite > 0]
        if positive.size:
            return LogNorm(vmin=float(positive.min()), vmax=max(float(positive.max()), float(positive.min()) * 10))
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if panel.symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        return Normalize(vmin=-m, vmax=m)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)


class FigureDrawing:
    """``panels`` side by side, laid out by ``figure_layout``, drawn by matplotlib. Values are shown
    as they are (``interpolation="nearest"``); NaN in a blue-grey that no colormap here uses, so
    "not measured yet" stands apart from "no electrons"; on a log scale zeros take the lowest
    colour. ``redraw`` shows new values of the same shapes in the same figure: half the cost of
    drawing it anew (the live images are redrawn every few seconds)."""

    def __init__(self, panels: Sequence[Panel], suptitle: str | None = None):
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layout = figure_layout([np.shape(p.image) for p in panels])
        width, height = layout.size
        fig = self.figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
        FigureCanvasAgg(fig)

        def axes(box: Box):
            x0, y0, x1, y1 = box
            return fig.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))

        self.panels = list(panels)
        self._images = []
        for panel, box, bar in zip(panels, layout.images, layout.colorbars):
            shown, norm = self._values(panel, panel.image)
            cmap = matplotlib.colormaps[panel.cmap].with_extremes(bad=(0.35, 0.35, 0.45))
            if panel.log:
                cmap = cmap.with_extremes(bad=cmap(0.0))
            ax = axes(box)
            im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel, fontsize=9)
            ax.set_ylabel(panel.ylabel, fontsize=9)
            ax.tick_params(labelsize=8)
            cbar = fig.colorbar(im, cax=axes(bar))
            cbar.set_label(panel.unit + (" (log scale)" if panel.log else ""), fontsize=9)
            cbar.ax.tick_params(labelsize=8)
            self._images.append(im)
        self._title = fig.text(0.01, 0.995, suptitle or "", fontsize=9, va="top", ha="left")

    @staticmethod
    def _values(panel: Panel, image: np.ndarray):
        values = np.asarray(image, dtype=np.float64)
        if values.ndim != 2 or 0 in values.shape:
            raise ValueError(f"{panel.title}: image must be a non-empty 2-D array, got shape {values.shape}")
        shown = np.ma.masked_invalid(values)
        if panel.log:
            shown = np.ma.masked_less_equal(shown, 0)
        return shown, _norm(panel, values)

    def redraw(self, images: Sequence[np.ndarray], suptitle: str | None = None) -> bytes:
        """PNG bytes with ``images`` (one per panel, same shapes) in place of the panels' values."""
        for panel, im, image in zip(self.panels, self._images, images):
            if np.shape(image) != np.shape(panel.image):
                raise ValueError(f"{panel.title}: redraw with shape {np.shape(image)}, drawn as "
                                 f"{np.shape(panel.image)}")
            shown, norm = self._values(panel, image)
            im.set_data(shown)
            im.set_clim(norm.vmin, norm.vmax)
        self._title.set_text(suptitle or "")
        return self.png()

    def png(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=FIGURE_DPI)
        return buf.getvalue()


def draw_figure(panels: Sequence[Panel], suptitle: str | None = None) -> bytes:
    """PNG bytes of ``panels`` side by side (see :class:`FigureDrawing`)."""
    return FigureDrawing(panels, suptitle).png()


def write_png_bytes(path: str | os.PathLike, png: bytes, *, overwrite: bool = True) -> bytes:
    """PNG bytes written to ``path`` atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(png)
    return png


def write_figure(path: str | os.PathLike, panels: Sequence[Panel], suptitle: str | None = None,
                 *, overwrite: bool = True) -> bytes:
    """``draw_figure`` written to ``path`` atomically; returns the PNG bytes."""
    return write_png_bytes(path, draw_figure(panels, suptitle), overwrite=overwrite)


def scan_panel(image: np.ndarray, title: str) -> Panel:
    """A virtual image: events per scan position, grey, axes in scan positions."""
    return Panel(image, title)


def com_panel(image: np.ndarray, title: str) -> Panel:
    """A centre-of-mass image: detector pixels from the disk centre per scan position, on a
    diverging colormap symmetric about 0 (white: no shift)."""
    return Panel(image, title, unit="detector pixels", cmap="RdBu_r", symmetric=True)


def pattern_panel(pattern: np.ndarray, title: str = "Summed diffraction pattern") -> Panel:
    """The summed diffraction pattern on a log scale, axes in detector pixels."""
    return Panel(pattern, title, xlabel="detector column (pixel)", ylabel="detector row (pixel)",
                 cmap="magma", log=True)
