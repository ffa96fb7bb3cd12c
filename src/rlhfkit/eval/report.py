"""The pipeline's HTML report: one self-contained ``report.html``.

The file needs no network: CSS is inline, every figure is a matplotlib PNG (Agg canvas, no pyplot
state) embedded as a base64 ``data:`` URI, and there are no external scripts or fonts. matplotlib
comes with the ``plot`` extra (``pip install 'rlhfkit[plot]'``) and is imported on first use. Every
text taken from the data (model output may contain ``<script>``) is HTML-escaped, so it renders
as text. Sections, each a ``<section id=...>`` with an ``<h2>``: ``summary``, ``curves``,
``reward-model``, ``win-rates``, ``overoptimisation``, ``samples``. A section whose data is
missing or empty shows a short "not available" note instead.

The report carries one small inline script, a self-check: on ``load`` it counts the images that
decoded (``naturalWidth > 0``) and stores the count in ``document.body.dataset.images`` (the
total in ``dataset.imagesTotal``). It reads nothing and loads nothing; it lets a headless browser
(the tests) confirm that every embedded figure decodes.

Input schema (every key optional except where a section needs it; ``None`` = not measured)::

    {"title": str, "created": str, "config": dict,
     "stages": {name: {"seconds": float, "status": "done"|"skipped"}},
     "headline": {group: {"prompts": int, "sft": CI, "final": CI, "gain": CI, "sentence": str,
                  "win_tie_loss": {"win": CI, "tie": CI, "loss": CI, "wins_per_loss": float, "n": int}}},
     "summary": {name: number or str},
     "curves": {"rl": [{"step": int, "reward": float, "proxy": float|None, "gold": float|None, "kl": float|None}],
                "dpo": [{"step": int, "loss": float, "accuracy": float|None, "chosen": float|None,
                         "rejected": float|None}]},
     "reward_model": {"accuracy": float, "pairs": int, "by_category": {name: accuracy},
                      "on_policy": {"pairs", "accuracy", "correctness_pairs", "correctness_accuracy"},
                      "ensemble": {"members": [{"seed", "dir", "accuracy", "pairs", "by_category"}],
                                   "modes": {"mean"|"min"|"uwo": {"accuracy", "pairs", "by_category", "lambda" (uwo)}},
                                   "warm": {"accuracy", "pairs", "by_category"},
                                   "used": "mean"|"min"|"uwo"|"warm"|None, "proxy": str|None} | absent},
     "win_rates": {"gold": {"win": float, "tie": float, "loss": float, "n": int}, "judge": {...} | absent},
     "overoptimisation": {"bon": [{"n", "kl", "d", "proxy", "gold"}], "rl": [{"step", "kl", "d", "proxy", "gold"}]},
     "samples": [{"prompt": str, "sft": str, "final": str, "sft_gold": float|None, "final_gold": float|None}]}

A CI is ``{"mean", "low", "high"}`` (:mod:`rlhfkit.eval.intervals`); the headline's groups are
``all``, ``seen`` and ``unseen`` (task types), shown first in the summary with their sentences.
The curves section draws the RL curves, or, when there are none, the direct-alignment ones
(loss and pair accuracy; the log-probs of the chosen and rejected replies, whose fall shows
likelihood displacement). Win, tie and loss are fractions of ``n`` (final model vs SFT).
In ``overoptimisation`` a point without ``d`` gets d = sqrt(kl). When a curve has a point at
d = 0 (best-of-1; the RL start) and at least three with d > 0, Gao's form (best-of-n: d (alpha - beta d); RL: d (alpha - beta log d))
is fitted to its reward gain over the d = 0 point (:mod:`rlhfkit.eval.overopt`) and drawn dashed,
and a table gives alpha, beta and the peak d*. For the RL curve a sentence and a table
(:func:`rl_gold_peak`) say where the gold reward peaked (the step and d of the highest gold point,
and the fitted d* where there is a fit) and how far the run went past it (final d minus peak d,
or that it did not reach its peak: its last step was its best). ``reward_model.ensemble`` (a
pipeline run with several reward models) adds a table of the held-out accuracy, overall and on
``wrong_answer`` pairs, of every member, ensemble mode and the WARM average, marking the one RL
optimised.
"""  # noqa: E501 (the schema lines are quoted verbatim)

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.atomic import atomic_write_text
from rlhfkit.eval.overopt import fit_gao_bon, fit_gao_rl, gao_peaks
from rlhfkit.extras import import_optional

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SECTIONS = (
    ("summary", "Summary"),
    ("curves", "Training curves"),
    ("reward-model", "Reward model"),
    ("win-rates", "Win rates"),
    ("overoptimisation", "Over-optimisation"),
    ("samples", "Samples"),
)
"""(section id, heading) in page order."""

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


def _num(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, non-numeric, NaN or infinite)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):  # numpy scalars are Real too
        return None
    return float(x) if math.isfinite(x) else None


def _fmt(x: Any, pct: bool = False) -> str:
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
            out.append(f'<td class="{cls}">{esc(cell if i < text_cols else _fmt(cell))}</td>')
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


def _na(what: str = "") -> str:
    return f'<p class="na">{esc(what or NOT_AVAILABLE)}</p>'


def _ci(x: dict[str, Any] | None, pct: bool = False) -> str:
    """``mean [low, high]`` of an interval, or n/a."""
    values = [_num((x or {}).get(k)) for k in ("mean", "low", "high")]
    if any(v is None for v in values):
        return "n/a"
    mean, low, high = (f"{100 * v:.1f}%" if pct else f"{v:.3f}" for v in values)
    return f"{mean} [{low}, {high}]"


GROUPS = {
    "all": "all held-out prompts",
    "seen": "task types RLHF saw",
    "unseen": "unseen task types",
}
"""Headline groups, as the report names them."""


def _headline(headline: dict[str, Any]) -> str:
    """The sentences and a table of gold reward, gain and win/tie/loss with 95% intervals."""
    sentences = [
        f"<p><b>{esc(GROUPS.get(name, name)[:1].upper() + GROUPS.get(name, name)[1:])}:</b> "
        f"{esc(g.get('sentence', ''))}</p>"
        for name, g in headline.items()
    ]
    rows = []
    for name, g in headline.items():
        wtl = g.get("win_tie_loss") or {}
        rows.append(
            [GROUPS.get(name, name), g.get("prompts"), _ci(g.get("sft")), _ci(g.get("final")),
             _ci(g.get("gain")), _ci(wtl.get("win"), True), _ci(wtl.get("tie"), True),
             _ci(wtl.get("loss"), True), wtl.get("wins_per_loss")]
        )  # fmt: skip
    head = ["prompts", "n", "gold SFT", "gold final", "gain", "win", "tie", "loss", "wins/loss"]
    note = "<p>Brackets: 95% intervals over prompts (each prompt's mean over its samples).</p>"
    return "".join(sentences) + table_html(head, rows) + note


def _summary(data: dict[str, Any]) -> str:
    parts = []
    if data.get("headline"):
        parts.append(_headline(data["headline"]))
    summary = data.get("summary") or {}
    if summary:
        parts.append(table_html(["figure", "value"], [[k, v] for k, v in summary.items()]))
    stages = data.get("stages") or {}
    if stages:
        rows = [
            [name, s.get("status", "n/a"), _num(s.get("seconds")), _num(s.get("peak_rss_gib"))]
            for name, s in stages.items()
        ]
        head = ["stage", "status", "seconds", "peak memory (GiB)"]
        parts.append("<h3>Stages</h3>" + table_html(head, rows))
    if data.get("config"):
        cfg = json.dumps(data["config"], indent=2, sort_keys=True, default=str)
        parts.append(f"<details><summary>Configuration</summary><pre>{esc(cfg)}</pre></details>")
    return "".join(parts) or _na()


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of ``rows`` where both are finite numbers."""
    pts = [(_num(r.get(x)), _num(r.get(y))) for r in rows]
    kept = [(a, b) for a, b in pts if a is not None and b is not None]
    return [a for a, _ in kept], [b for _, b in kept]


Panel = tuple[str, str, Sequence[tuple[str, str]]]
"""One axes of a curves figure: title, y label, and the (key, legend label) series it draws."""

CURVE_PANELS: dict[str, tuple[Panel, Panel]] = {
    "rl": (
        ("RL reward", "reward", [("reward", "reward"), ("proxy", "proxy (RM)"), ("gold", "gold")]),
        ("KL", "KL(policy || reference)", [("kl", "KL")]),
    ),
    "dpo": (
        ("Preference loss and accuracy", "", [("loss", "loss"), ("accuracy", "pair accuracy")]),
        ("Chosen and rejected", "log-prob of the reply",
         [("chosen", "chosen"), ("rejected", "rejected")]),
    ),
}  # fmt: skip
"""The curves section's figures, by kind: RL first, else direct alignment."""


def _curves(data: dict[str, Any]) -> str:
    curves = data.get("curves") or {}
    for kind, panels in CURVE_PANELS.items():
        rows = curves.get(kind) or []
        lines = {k: _series(rows, "step", k) for _, _, series in panels for k, _ in series}
        if any(xs for xs, _ in lines.values()):
            break
    else:
        return _na()

    def draw(fig: Figure) -> None:
        for ax, (title, ylabel, series) in zip(fig.subplots(1, 2), panels, strict=True):
            for key, label in series:
                if lines[key][0]:
                    ax.plot(*lines[key], marker=".", label=label)
            ax.set(xlabel="step", ylabel=ylabel, title=title)
            if len(series) > 1:
                ax.legend(loc="best")

    titles = " and ".join(title for title, _, _ in panels)
    return figure_html(draw, f"{titles} against step", (10, 3.6))


def _reward_model(data: dict[str, Any]) -> str:
    rm = data.get("reward_model") or {}
    overall = _num(rm.get("accuracy"))
    if overall is None:
        return _na()
    cats = {str(k): v for k, v in (rm.get("by_category") or {}).items() if _num(v) is not None}
    rows = [["overall", overall, rm.get("pairs")]] + [[k, v, None] for k, v in cats.items()]
    cells = [[a, _fmt(b, True), c] for a, b, c in rows]
    table = table_html(["category", "accuracy", "pairs"], cells)
    names, accs = [r[0] for r in rows], [float(r[1]) for r in rows]
    live = rm.get("on_policy") or {}
    if live:
        table += (
            "<p>On the SFT model's own samples (pairs of one prompt's samples that the gold judge "
            f"ranks apart, what RL optimises against): {_fmt(live.get('accuracy'), True)} of "
            f"{_fmt(live.get('pairs'))} pairs ordered as the gold judge orders them; "
            f"{_fmt(live.get('correctness_accuracy'), True)} of the "
            f"{_fmt(live.get('correctness_pairs'))} where one sample is right and the other "
            "wrong.</p>"
        )

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ax.bar(names, accs, color=["tab:blue"] + ["tab:gray"] * len(cats))
        ax.axhline(0.5, color="k", linestyle=":", linewidth=1)  # chance
        ax.set(ylim=(0, 1), ylabel="held-out accuracy", title="Reward-model accuracy")
        ax.tick_params(axis="x", labelrotation=30)

    figure = figure_html(draw, "reward-model accuracy per category", (7, 3.4))
    return table + figure + (_ensemble(rm["ensemble"]) if rm.get("ensemble") else "")


def _ensemble(ens: dict[str, Any]) -> str:
    """The accuracy of every member, ensemble mode and WARM, marking what RL optimised."""
    used = ens.get("used")
    rows: list[tuple[str, dict[str, Any], bool]] = [
        (f"member {k} (seed {_fmt(m.get('seed'))})", m, False)
        for k, m in enumerate(ens.get("members") or [])
    ]
    for mode, m in (ens.get("modes") or {}).items():
        lam = f" (lambda {_fmt(m.get('lambda'))})" if m.get("lambda") is not None else ""
        rows.append((f"ensemble {mode}{lam}", m, used == mode))
    if ens.get("warm"):
        rows.append(("WARM (weight average)", ens["warm"], used == "warm"))
    cells = [
        [name, _fmt(m.get("accuracy"), True),
         _fmt((m.get("by_category") or {}).get("wrong_answer"), True), m.get("pairs"),
         "RL reward" if is_used else ""]
        for name, m, is_used in rows
    ]  # fmt: skip
    head = ["reward model", "accuracy", "on wrong_answer", "pairs", "used"]
    proxy = f" RL optimised <code>{esc(ens['proxy'])}</code>." if ens.get("proxy") else ""
    return (
        "<h3>Reward-model ensemble</h3><p>Held-out pairwise accuracy of each reward model trained"
        " (one per seed), of their scores combined (mean, min, or uwo: mean - lambda * std) and"
        f" of the average of their weights (WARM).{proxy}</p>" + table_html(head, cells)
    )


def _win_rates(data: dict[str, Any]) -> str:
    wr = data.get("win_rates") or {}
    judges = [
        (name, wr[key])
        for key, name in [("gold", "gold judge"), ("judge", "LLM judge")]
        if isinstance(wr.get(key), dict)
    ]
    if not judges:
        return _na()
    cols = ("win", "tie", "loss")
    vals = {name: [_num(r.get(c)) or 0.0 for c in cols] for name, r in judges}
    rows = [[name, *(_fmt(r.get(c), True) for c in cols), r.get("n")] for name, r in judges]
    table = table_html(["judge (final vs SFT)", *cols, "n"], rows)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        left = [0.0] * len(judges)
        for i, (col, color) in enumerate(
            zip(cols, ["tab:green", "tab:gray", "tab:red"], strict=True)
        ):
            width = [vals[name][i] for name, _ in judges]
            ax.barh([n for n, _ in judges], width, left=left, color=color, label=col)
            left = [a + b for a, b in zip(left, width, strict=True)]
        ax.set(xlim=(0, 1), xlabel="fraction of prompts", title="Final model vs SFT")
        ax.invert_yaxis()  # first judge on top, as in the table
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return table + figure_html(draw, "win/tie/loss of final vs SFT", (7, 1.2 + 0.6 * len(judges)))


def _gao(points: tuple[list[float], list[float]], rl: bool) -> tuple[float, float] | None:
    """Gao's (alpha, beta) fitted to the gain over the d = 0 point; None without one or < 3 more."""
    d, r = points
    if not d or d[0] != 0 or sum(x > 0 for x in d) < 3:
        return None
    try:
        return (fit_gao_rl if rl else fit_gao_bon)(d, [y - r[0] for y in r])
    except ValueError:
        return None


def _overopt_points(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The (d, reward) points of one curve, sorted by d; d = sqrt(kl) where ``d`` is missing."""
    filled = []
    for r in rows:
        d, kl = _num(r.get("d")), _num(r.get("kl"))
        if d is None and kl is not None:
            d = math.sqrt(max(kl, 0.0))
        filled.append({**r, "d": d})
    d, y = _series(filled, "d", key)
    order = sorted(range(len(d)), key=d.__getitem__)
    return [d[i] for i in order], [y[i] for i in order]


def _overoptimisation(data: dict[str, Any]) -> str:
    oo = data.get("overoptimisation") or {}
    curves = {
        (kind, key): _overopt_points(oo.get(kind) or [], key)
        for kind in ("bon", "rl")
        for key in ("proxy", "gold")
    }
    if not any(d for d, _ in curves.values()):
        return _na()
    fits = {k: _gao(pts, rl=k[0] == "rl") for k, pts in curves.items()}
    marks = {"bon": ("o", ":", "best-of-n"), "rl": ("s", "-", "RL")}
    colors = {"proxy": "tab:blue", "gold": "tab:orange"}

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        for (kind, key), (d, y) in curves.items():
            if not d:
                continue
            marker, line, name = marks[kind]
            ax.plot(d, y, marker=marker, linestyle=line, color=colors[key], label=f"{name} {key}")
            fit = fits[(kind, key)]
            if fit is not None:
                grid = [d[-1] * (i + 1) / 100 for i in range(100)]
                gain = [x * (fit[0] - fit[1] * (math.log(x) if kind == "rl" else x)) for x in grid]
                ax.plot(grid, [y[0] + g for g in gain], "--", color=colors[key], linewidth=1)
        ax.set(xlabel="d = sqrt(KL(policy || initial))", ylabel="reward")
        ax.set_title("Proxy vs gold reward as the policy moves away (dashed: Gao fits)")
        ax.legend(loc="best", fontsize="small")

    rows = []
    for (kind, key), fit in fits.items():
        if fit is not None:
            peak = gao_peaks(*fit)[1 if kind == "rl" else 0]
            rows.append([f"{marks[kind][2]} {key}", fit[0], fit[1], peak])
    table = table_html(["curve", "alpha", "beta", "peak d*"], rows) if rows else ""
    fit = fits[("rl", "gold")]
    peak = rl_gold_peak(oo.get("rl") or [], gao_peaks(*fit)[1] if fit is not None else None)
    figure = figure_html(draw, "proxy and gold reward against sqrt(KL)", (8, 4.5))
    return figure + table + (_peak_html(peak) if peak else "")


def rl_gold_peak(
    rows: Sequence[dict[str, Any]], d_star: float | None = None
) -> dict[str, Any] | None:
    """Where an RL run's gold reward peaked and how far the run went past the peak.

    Args:
        rows: The RL points (``step``, ``d`` or ``kl``, ``gold``), in any order.
        d_star: The peak of Gao's RL fit to the gold curve, when there is one.

    Returns:
        None without a point that has gold and d; else ``{"step", "d", "gold"}`` of the highest
        gold point (the first at a tie), ``final_step``, ``final_d`` and ``final_gold`` of the
        last point (the highest step; the highest d without steps), ``reached`` (whether a
        point with a lower gold reward came after the peak: else the run did not reach its
        peak), ``flat`` (every point's gold is the same: no peak), ``past`` (final d minus peak
        d; None when not reached), ``d_star`` (inf: the fit never turns down) and ``sentence``.
    """
    points = []
    for r in rows:
        d, kl, step = _num(r.get("d")), _num(r.get("kl")), _num(r.get("step"))
        d = math.sqrt(max(kl, 0.0)) if d is None and kl is not None else d
        if d is not None:
            step = int(step) if step is not None and step.is_integer() else step
            points.append({"step": step, "d": d, "gold": _num(r.get("gold"))})
    if not any(p["gold"] is not None for p in points):
        return None
    steps = all(p["step"] is not None for p in points)
    points.sort(key=lambda p: p["step"] if steps else p["d"])  # stable: ties keep their order
    scored = [p for p in points if p["gold"] is not None]
    best, last = max(scored, key=lambda p: p["gold"]), points[-1]  # max: the first of equals
    flat = all(p["gold"] == best["gold"] for p in scored)
    reached = best is not scored[-1] and not flat
    past = last["d"] - best["d"] if reached else None
    d_star = None if d_star is None or math.isnan(d_star) else d_star
    at = f"step {_fmt(best['step'])}, " if best["step"] is not None else ""
    where = f"({at}d = {best['d']:.3f}, gold {best['gold']:.3f})"
    if d_star is None:
        fit = ""
    elif math.isinf(d_star):
        fit = "; Gao's fit never turns down (no finite peak d*)"
    else:
        beyond = ", beyond the run's final d" if d_star > last["d"] else ""
        fit = f"; Gao's fit puts the peak at d* = {d_star:.3f}{beyond}"
    end = f"step {_fmt(last['step'])}, " if last["step"] is not None else ""
    if flat:
        sentence = (
            f"The RL gold reward did not change over the run ({best['gold']:.3f} at every "
            f"measured point): it has no peak{fit}."
        )
    elif reached:
        sentence = (
            f"The RL gold reward peaked {where}{fit}. The run ended at {end}d = {last['d']:.3f}: "
            f"{past:+.3f} in d past the measured peak."
        )
    else:
        sentence = (
            f"The RL gold reward was highest at the run's last point {where}: the run did not "
            f"reach its peak{fit}."
        )
    return {**{k: best[k] for k in ("step", "d", "gold")}, "final_step": last["step"],
            "final_d": last["d"], "final_gold": last["gold"], "reached": reached, "flat": flat,
            "past": past, "d_star": d_star, "sentence": sentence}  # fmt: skip


def _peak_html(peak: dict[str, Any]) -> str:
    """The peak sentence and its table (measured peak, fitted peak, final point, distance)."""
    rows = [["gold peak (measured)", peak["step"], peak["d"], peak["gold"]]]
    if peak["d_star"] is not None:
        rows.append(["gold peak (Gao fit d*)", None, peak["d_star"], None])
    rows.append(["final point", peak["final_step"], peak["final_d"], peak["final_gold"]])
    past = peak["past"] if peak["reached"] else "no peak" if peak["flat"] else "not reached"
    rows.append(["final d - peak d", None, past, None])
    head = ["RL gold reward", "step", "d", "gold"]
    return f'<p class="peak">{esc(peak["sentence"])}</p>' + table_html(head, rows)


def _samples(data: dict[str, Any]) -> str:
    samples = data.get("samples") or []
    if not samples:
        return _na()
    rows = [
        [
            s.get("prompt", ""),
            s.get("sft", ""),
            s.get("final", ""),
            s.get("sft_gold"),
            s.get("final_gold"),
        ]
        for s in samples
    ]
    return table_html(["prompt", "SFT", "final", "SFT gold", "final gold"], rows, text_cols=3)


BUILDERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "summary": _summary,
    "curves": _curves,
    "reward-model": _reward_model,
    "win-rates": _win_rates,
    "overoptimisation": _overoptimisation,
    "samples": _samples,
}


def render_report(data: dict[str, Any], path: str | Path) -> Path:
    """Write the self-contained HTML report of ``data`` (schema in the module docstring).

    Args:
        data: The run's figures; sections whose data is missing show a "not available" note.
        path: Where to write the HTML file (written atomically; parents are created).

    Returns:
        The path written.

    Raises:
        MissingExtraError: When matplotlib (the ``plot`` extra) is not installed.
    """
    matplotlib_classes()  # fail before any work, whether or not this data has a figure to draw
    title = str(data.get("title") or "rlhfkit report")
    created = data.get("created")
    body = [f"<h1>{esc(title)}</h1>"]
    if created:
        body.append(f"<p>Created {esc(created)}</p>")
    for sid, heading in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{esc(heading)}</h2>{BUILDERS[sid](data)}</section>')
    return write_page(title, body, path)


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
