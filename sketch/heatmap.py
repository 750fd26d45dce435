"""Heat maps of a :class:`~sketch.matrix.ShareMatrix`: a PNG (matplotlib, Agg backend) and a self-contained HTML page.

Rows are sources (the image to move), columns targets (an image already at the destination).
Each cell shows one ratio of :data:`sketch.matrix.CELL_VALUES` as its colour and as text, with the
paper's ``distinct (duplicates-counted)`` percentages below it while cells are large enough. The
colour scale is fixed at 0-100% so two heat maps compare at a glance. Both files are written to a
temporary name and renamed, so a reader never sees half a file. matplotlib is imported only when
a PNG is drawn.
"""

from __future__ import annotations

import html
import math

import numpy as np

from .matrix import CELL_VALUES, DEFAULT_CELL_VALUE, ShareMatrix
from .output import atomic_output

# ColorBrewer YlGnBu (9 classes), the same ramp as matplotlib's "YlGnBu": light = little shared.
PALETTE = ["#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4", "#1d91c0", "#225ea8", "#253494", "#081d58"]
COLORMAP = "YlGnBu"
DIAGONAL_COLOR = "#e6e6e6"
LABEL_CHARS = 30
SCALE_LABELS = {
    "nonzero": "distinct non-zero blocks found in the target (%)",
    "distinct": "paper's distinct ratio (%)",
    "counted": "paper's ratio, duplicates counted (%)",
}


def shorten(name: str, limit: int = LABEL_CHARS) -> str:
    """``name`` cut in the middle with an ellipsis when longer than ``limit`` (both ends tell images apart)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "\u2026" + name[len(name) - (limit - 1 - head):]


def color(ratio: float) -> str:
    """The palette colour of ``ratio`` (0..1), interpolated, as ``#rrggbb``."""
    rgb = _rgb(ratio)
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _rgb(ratio: float) -> tuple[float, float, float]:
    position = min(max(ratio, 0.0), 1.0) * (len(PALETTE) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(PALETTE) - 1)
    fraction = position - low
    a, b = (_hex(PALETTE[low]), _hex(PALETTE[high]))
    return tuple(x + (y - x) * fraction for x, y in zip(a, b))  # type: ignore[return-value]


def _hex(value: str) -> tuple[float, float, float]:
    return tuple(int(value[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def text_color(rgb: tuple[float, float, float]) -> str:
    """Black or white, whichever reads better on ``rgb`` (WCAG relative luminance)."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(rgb[0]) + 0.7152 * linear(rgb[1]) + 0.0722 * linear(rgb[2])
    # Contrast with white (1.05 / (L + 0.05)) beats contrast with black ((L + 0.05) / 0.05) below L ~0.18.
    return "#ffffff" if luminance < 0.18 else "#000000"


def _row_label(matrix: ShareMatrix, index: int) -> str:
    image = matrix.images[index]
    block_map = image.block_map
    zero = block_map.zero_blocks / block_map.total_blocks if block_map.total_blocks else 0.0
    return f"{shorten(image.name)}  ({zero * 100:.0f}% zero)"


def render_png(matrix: ShareMatrix, path: str, cell_value: str = DEFAULT_CELL_VALUE, dpi: int = 110,
               force: bool = False) -> None:
    """Draw the heat map of ``cell_value`` into the PNG file ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    grid = matrix.grid(cell_value) * 100
    n = len(matrix.images)
    cell = 1.25 if n <= 5 else 1.05 if n <= 8 else max(0.42, 9.0 / n)
    detail = cell >= 1.0  # room for the paper's figures under the main number
    with_text = cell >= 0.42
    row_labels = [_row_label(matrix, i) for i in range(n)]
    column_labels = [shorten(name) for name in matrix.names]
    # Margins in inches from the label lengths (~0.075 in a character at 9 pt): long names never overlap.
    label_inches = 0.075 * max(len(label) for label in row_labels) + 0.6
    bottom_inches = 0.045 * max(len(label) for label in column_labels) + 0.8  # labels slanted at 35 degrees
    top_inches = 1.3
    width = label_inches + n * cell + 1.7
    height = bottom_inches + n * cell + top_inches

    figure = Figure(figsize=(width, height), dpi=dpi)
    axes = figure.add_axes((label_inches / width, bottom_inches / height, n * cell / width, n * cell / height))
    shown = np.ma.masked_invalid(grid)
    cmap = matplotlib.colormaps[COLORMAP].with_extremes(bad=DIAGONAL_COLOR)
    picture = axes.imshow(shown, cmap=cmap, vmin=0, vmax=100, aspect="equal")
    axes.set_xticks(range(n), labels=column_labels, rotation=35, ha="right", rotation_mode="anchor", fontsize=9)
    axes.set_yticks(range(n), labels=row_labels, fontsize=9)
    axes.set_xlabel("target: image already at the destination", fontsize=10)
    axes.set_ylabel("source: image to move", fontsize=10)
    axes.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    axes.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    axes.grid(which="minor", color="white", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    for side in axes.spines.values():
        side.set_visible(False)
    if with_text:
        main_size = 13 if detail else max(6.0, 11 * cell)
        for i in range(n):
            for j in range(n):
                if i == j:
                    axes.text(j, i, "\u2014", ha="center", va="center", color="#777777", fontsize=main_size)
                    continue
                ink = text_color(tuple(cmap(grid[i, j] / 100)[:3]))
                if detail:
                    metrics = matrix.pair(i, j).metrics
                    axes.text(j, i - 0.1, f"{grid[i, j]:.1f}%", ha="center", va="center", color=ink,
                              fontsize=main_size, fontweight="bold")
                    paper = f"{metrics.shared_unique_ratio * 100:.2f} ({metrics.shared_ratio * 100:.2f})"
                    axes.text(j, i + 0.25, paper, ha="center", va="center", color=ink, fontsize=7.5)
                else:
                    axes.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color=ink, fontsize=main_size)
    bar_left = (label_inches + n * cell + 0.3) / width
    bar_axes = figure.add_axes((bar_left, axes.get_position().y0, 0.22 / width, n * cell / height))
    bar = figure.colorbar(picture, cax=bar_axes)
    bar.set_label(SCALE_LABELS[cell_value], fontsize=9)
    bar.ax.tick_params(labelsize=8)
    lines = [f"Blocks shared between images ({matrix.block_size}-byte blocks)",
             f"colour and number: {CELL_VALUES[cell_value]}"]
    if detail:
        lines.append("small print: the paper's distinct % (duplicates-counted %) over all blocks, zeros included")
    figure.text(0.5 / width, 1 - 0.25 / height, lines[0], ha="left", va="top", fontsize=12, fontweight="bold")
    figure.text(0.5 / width, 1 - 0.62 / height, "\n".join(lines[1:]), ha="left", va="top", fontsize=9,
                linespacing=1.5)

    def write(out) -> None:
        figure.savefig(out, format="png", dpi=dpi)

    with atomic_output(path, force=force, inputs=[image.path for image in matrix.images], what="heat map") as out:
        write(out)


def html_page(matrix: ShareMatrix, cell_value: str = DEFAULT_CELL_VALUE) -> str:
    """A self-contained HTML page (inline CSS, no scripts) with the heat map table and a colour legend."""
    grid = matrix.grid(cell_value)
    n = len(matrix.images)
    escape = html.escape
    head = "".join(f'<th class="col" title="{escape(image.path)}"><span>{escape(shorten(image.name))}</span></th>'
                   for image in matrix.images)
    rows = []
    for i in range(n):
        image = matrix.images[i]
        cells = [f'<th class="row" title="{escape(image.path)}">{escape(_row_label(matrix, i))}</th>']
        for j in range(n):
            if i == j:
                cells.append('<td class="self">\u2014</td>')
                continue
            pair = matrix.pair(i, j)
            metrics = pair.metrics
            rgb = _rgb(grid[i, j])
            tip = (f"{image.name} \u2192 {matrix.images[j].name}\n"
                   f"non-zero distinct shared: {pair.nonzero_shared_unique_ratio * 100:.2f}%\n"
                   f"paper: {metrics.shared_unique_ratio * 100:.2f}% ({metrics.shared_ratio * 100:.2f}%)\n"
                   f"zero blocks: {pair.zero_ratio * 100:.2f}%\n"
                   f"to send: {metrics.send_blocks} blocks, {pair.send_bytes} bytes")
            cells.append(f'<td style="background:{color(grid[i, j])};color:{text_color(rgb)}" title="{escape(tip)}">'
                         f'<b>{grid[i, j] * 100:.1f}%</b><small>{metrics.shared_unique_ratio * 100:.2f} '
                         f'({metrics.shared_ratio * 100:.2f})</small></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    gradient = ", ".join(PALETTE)
    heading = escape(f"Blocks shared between images ({matrix.block_size}-byte blocks)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: separate; border-spacing: 2px; }}
td {{ width: 7em; height: 4.2em; text-align: center; vertical-align: middle; font-size: 15px; }}
td small {{ display: block; font-size: 11px; margin-top: .3em; }}
td.self {{ background: {DIAGONAL_COLOR}; color: #777; }}
th {{ font-weight: normal; font-size: 13px; }}
th.row {{ text-align: right; padding-right: .6em; white-space: nowrap; }}
th.col {{ height: 9em; vertical-align: bottom; white-space: nowrap; }}
th.col span {{ display: inline-block; writing-mode: vertical-rl; transform: rotate(180deg); }}
.axis {{ font-size: 13px; color: #555; }}
.legend {{ display: flex; align-items: center; gap: .6em; margin: 1em 0; font-size: 13px; }}
.ramp {{ width: 18em; height: 1em; background: linear-gradient(to right, {gradient}); border: 1px solid #aaa; }}
</style></head>
<body>
<h1 style="font-size:20px">{heading}</h1>
<p>Colour and number: {escape(CELL_VALUES[cell_value])}. Small print: the paper's distinct % (duplicates-counted %)
over all blocks of the row image, zeros included. Hover a cell for blocks and bytes to send.</p>
<div class="legend"><span>0%</span><div class="ramp"></div><span>100% {escape(cell_value)} share</span></div>
<p class="axis">rows: source, the image to move &middot; columns: target, an image already at the destination</p>
<table>
<tr><th></th>{head}</tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def render_html(matrix: ShareMatrix, path: str, cell_value: str = DEFAULT_CELL_VALUE, force: bool = False) -> None:
    """Write :func:`html_page` to ``path``."""
    page = html_page(matrix, cell_value).encode("utf-8")
    with atomic_output(path, force=force, inputs=[image.path for image in matrix.images], what="heat map") as out:
        out.write(page)
