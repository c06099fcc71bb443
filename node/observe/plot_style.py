"""One plotting style for every PNG the tool writes (run plots, study plots, reproduction plots).

Figures are built with matplotlib's object API on the Agg canvas: `Figure()` + `FigureCanvasAgg`, no
pyplot and no global backend or rcParams changes, so plotting is thread-safe, needs no display and does
not disturb other matplotlib users in the same process (a notebook, a test runner).

The helpers encode the readability rules of issue 10: integer ticks on count axes (TP degree, nodes,
sockets, experts), log scales when values span a decade or more, plain numbers rather than 10^k
notation, legends outside the data area, and saving with a tight bounding box so no annotation is cut.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["DECADE_RATIO", "new_figure", "save_figure", "spans_decades", "plain_number", "count_axis",
           "log_axis", "legend_outside", "footnote", "style_axes"]

DECADE_RATIO = 10.0   # max/min at or above which an axis of positive values is drawn in log scale
DPI = 120
GRID_ALPHA = 0.3


def new_figure(width_in: float, height_in: float) -> Figure:
    """A constrained-layout figure attached to an Agg canvas: layout makes room for legends and labels."""
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Write `figure` as PNG; the tight bounding box keeps every annotation and outside legend whole."""
    figure.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    return path


def spans_decades(values: Iterable[float], ratio: float = DECADE_RATIO) -> bool:
    """True if the values are all positive and max/min >= ratio: a linear axis would flatten the small ones."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) >= ratio


def plain_number(value: float, _pos: int | None = None) -> str:
    """Tick text without scientific notation: 2, 16, 1,000, 0.05, 2.5 (a reader reads it at a glance)."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1 and abs(value - round(value)) < 1e-9 * magnitude:
        return f"{round(value):,}"
    if magnitude >= 1:
        return f"{value:,.3g}" if magnitude < 1e6 else f"{value:.3g}"
    return f"{value:.3g}"


def _powers_of_two(values: Sequence[int]) -> list[int]:
    """Every power of two from the smallest to the largest value (the ticks of a log2 count axis)."""
    low, high = int(math.log2(min(values))), int(math.log2(max(values)))
    return [1 << k for k in range(low, high + 1)]


def _axis(axes: Axes, which: str) -> Axis:
    """The x or y Axis of `axes` (the helpers take the Axes so they can use its public set_*scale)."""
    if which not in ("x", "y"):
        raise ValueError(f"which must be 'x' or 'y', not {which!r}")
    return axes.xaxis if which == "x" else axes.yaxis


def count_axis(axes: Axes, which: str, values: Iterable[float], log2: bool = False) -> list[int]:
    """Integer ticks on a count axis (TP degree, nodes, sockets, experts); returns the tick values.

    Ticks sit on powers of two when every value is one (1, 2, 4, 8 ...), otherwise on the values
    themselves (10, 60, 150 experts), so the ticks name the measured points and never read 2.0 or 2^4.
    """
    axis = _axis(axes, which)
    ints = sorted({int(round(float(v))) for v in values})
    if log2:
        if not ints or ints[0] <= 0:
            raise ValueError("a log2 count axis needs positive values")
        getattr(axes, f"set_{which}scale")("log", base=2)
    is_pow2 = bool(ints) and all(v > 0 and v & (v - 1) == 0 for v in ints)
    ticks = _powers_of_two(ints) if log2 and is_pow2 else ints
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{int(round(v)):,}"))
    axis.set_minor_locator(ticker.NullLocator())
    return ticks


def log_axis(axes: Axes, which: str, low: float, high: float) -> None:
    """Log-10 axis labelled with plain numbers; denser labels when the range covers few decades.

    Matplotlib's default labels a sub-decade log range only with minor ticks like 3x10^2; here a
    range under one decade is labelled at 1..9 x 10^k, under two at 1, 2, 5 x 10^k, else at 10^k.
    """
    axis = _axis(axes, which)
    getattr(axes, f"set_{which}scale")("log")
    decades = math.log10(high / low) if low > 0 and high > low else 0.0
    subs = (1, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1 else (1, 2, 5) if decades < 2 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(plain_number))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs="auto"))
    axis.set_minor_formatter(ticker.NullFormatter())


def legend_outside(axes: Axes, **kwargs) -> None:
    """Legend to the right of the axes, never over data; constrained layout makes room for it."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                    fontsize=kwargs.pop("fontsize", "small"), **kwargs)


def footnote(axes: Axes, text: str, width_chars: int = 100, colour: str = "black") -> None:
    """Wrapped text under the axes (errors, caveats): part of the layout, so it is never cut."""
    axes.annotate("\n".join(textwrap.wrap(text, width_chars)), xy=(0.0, 0.0), xycoords="axes fraction",
                  xytext=(0, -36), textcoords="offset points", va="top", ha="left", fontsize="small",
                  color=colour, annotation_clip=False)


def style_axes(axes: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Title, labels and a light grid: the same look on every plot."""
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, which="major", alpha=GRID_ALPHA)
