"""Building blocks of rlhfkit's self-contained HTML pages (the pipeline's report, ``overopt``'s).

A page needs no network: CSS is inline, every figure is a matplotlib PNG (Agg canvas, no pyplot
state) embedded as a base64 ``data:`` URI, and there are no external scripts or fonts. matplotlib
comes with the ``plot`` extra (``pip install 'rlhfkit[plot]'``) and is imported on first use.
Every text taken from data (model output may contain ``<script>``) is HTML-escaped, so it
renders as text.

A page carries one small inline script, a self-check: on ``load`` it counts the images that
decoded (``naturalWidth > 0``) and stores the count in ``document.body.dataset.images`` (the
total in ``dataset.imagesTotal``). It reads nothing and loads nothing; it lets a headless browser
(the tests) confirm that every embedded figure decodes.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.atomic import atomic_write_text
from rlhfkit.extras import import_optional

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
section{margin:2rem 0;padding-top:.5rem;border-top:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85rem;max-width:30rem}
img{max-width:100%;display:block;margin:.5rem 0} p.na{color:#888;font-style:italic}
"""

CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.dataset.images = String(ok);
  document.body.dataset.imagesTotal = String(imgs.length);
});
"""

NOT_AVAILABLE = "Not available: this run recorded no data for this section."


def esc(x: Any) -> str:
    """``x`` as text, HTML-escaped (quotes too)."""
    return html.escape(str(x), quote=True)


def finite(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, non-numeric, NaN or infinite)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy scalars are Real too
        return None
    return float(x) if math.isfinite(x) else None


def cell_text(x: Any, pct: bool = False) -> str:
    """A cell's text: numbers to 4 significant digits (or a percentage), None/NaN to n/a."""
    if x is None or (isinstance(x, numbers.Real) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or (isinstance(x, numbers.Integral) and not pct):
        return str(x)
    if isinstance(x, numbers.Real):
        return f"{100 * x:.1f}%" if pct else f"{x:.4g}"
    return str(x)


def table_html(head: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: int = 0) -> str:
    """An escaped table; the first ``text_cols`` columns hold long texts (pre-wrapped)."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = "text" if i < text_cols else "num" if isinstance(cell, numbers.Real) else ""
            out.append(f'<td class="{cls}">{esc(cell if i < text_cols else cell_text(cell))}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@cache
def matplotlib_classes() -> tuple[Any, Any]:
    """Matplotlib's ``Figure`` and Agg canvas classes (the ``plot`` extra)."""
    figure = import_optional("matplotlib.figure", "plot", "the HTML report")
    agg = import_optional("matplotlib.backends.backend_agg", "plot", "the HTML report")
    return figure.Figure, agg.FigureCanvasAgg


def figure_html(draw: Callable[[Figure], None], alt: str, size: tuple[float, float]) -> str:
    """Draw onto a fresh figure and return it as an ``<img>`` with a base64 PNG data URI."""
    figure_class, canvas_class = matplotlib_classes()
    fig = figure_class(figsize=size, dpi=100, layout="constrained")
    canvas_class(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def not_available(what: str = "") -> str:
    """A greyed note: ``what``, or that the run recorded no data for the section."""
    return f'<p class="na">{esc(what or NOT_AVAILABLE)}</p>'


def ci_text(x: dict[str, Any] | None, pct: bool = False) -> str:
    """``mean [low, high]`` of an interval, or n/a."""
    values = [finite((x or {}).get(k)) for k in ("mean", "low", "high")]
    if any(v is None for v in values):
        return "n/a"
    mean, low, high = (f"{100 * v:.1f}%" if pct else f"{v:.3f}" for v in values)
    return f"{mean} [{low}, {high}]"


def write_page(title: str, body: list[str], path: str | Path) -> Path:
    """Write a self-contained page of ``body`` sections under ``title`` (atomically)."""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{CSS}</style>"
        f"<script>{CHECK_SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path
