"""The pipeline's HTML report: one self-contained ``report.html``.

Sections, each a ``<section id=...>`` with an ``<h2>``: ``summary``, ``curves``,
``reward-model``, ``win-rates``, ``overoptimisation``, ``samples``. A section whose data is
missing or empty shows a short "not available" note instead. The page is built from
:mod:`rlhfkit.eval.html` (no network, figures embedded, every text escaped, an image self-check).

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
d = 0 (best-of-1; the RL start) and at least three with d > 0, Gao's form (best-of-n:
d (alpha - beta d); RL: d (alpha - beta log d)) is fitted to its reward gain over the d = 0 point (:mod:`rlhfkit.eval.overopt`) and drawn dashed,
and a table gives alpha, beta and the peak d*. For the RL curve a sentence and a table
(:func:`rl_gold_peak`) say where the gold reward peaked (the step and d of the highest gold point,
and the fitted d* where there is a fit) and how far the run went past it (final d minus peak d,
or that it did not reach its peak: its last step was its best). ``reward_model.ensemble`` (a
pipeline run with several reward models) adds a table of the held-out accuracy, overall and on
``wrong_answer`` pairs, of every member, ensemble mode and the WARM average, marking the one RL
optimised.
"""  # noqa: E501 (the schema lines are quoted verbatim)

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.eval.html import (
    cell_text,
    ci_text,
    esc,
    figure_html,
    finite,
    matplotlib_classes,
    not_available,
    table_html,
    write_page,
)
from rlhfkit.eval.overopt import fit_gao_bon, fit_gao_rl, gao_peaks

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
            [GROUPS.get(name, name), g.get("prompts"), ci_text(g.get("sft")),
             ci_text(g.get("final")), ci_text(g.get("gain")), ci_text(wtl.get("win"), True),
             ci_text(wtl.get("tie"), True), ci_text(wtl.get("loss"), True),
             wtl.get("wins_per_loss")]
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
            [name, s.get("status", "n/a"), finite(s.get("seconds")), finite(s.get("peak_rss_gib"))]
            for name, s in stages.items()
        ]
        head = ["stage", "status", "seconds", "peak memory (GiB)"]
        parts.append("<h3>Stages</h3>" + table_html(head, rows))
    if data.get("config"):
        cfg = json.dumps(data["config"], indent=2, sort_keys=True, default=str)
        parts.append(f"<details><summary>Configuration</summary><pre>{esc(cfg)}</pre></details>")
    return "".join(parts) or not_available()


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of ``rows`` where both are finite numbers."""
    pts = [(finite(r.get(x)), finite(r.get(y))) for r in rows]
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
        return not_available()

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
    overall = finite(rm.get("accuracy"))
    if overall is None:
        return not_available()
    cats = {str(k): v for k, v in (rm.get("by_category") or {}).items() if finite(v) is not None}
    rows = [["overall", overall, rm.get("pairs")]] + [[k, v, None] for k, v in cats.items()]
    cells = [[a, cell_text(b, True), c] for a, b, c in rows]
    table = table_html(["category", "accuracy", "pairs"], cells)
    names, accs = [r[0] for r in rows], [float(r[1]) for r in rows]
    live = rm.get("on_policy") or {}
    if live:
        table += (
            "<p>On the SFT model's own samples (pairs of one prompt's samples that the gold judge "
            f"ranks apart, what RL optimises against): {cell_text(live.get('accuracy'), True)} of "
            f"{cell_text(live.get('pairs'))} pairs ordered as the gold judge orders them; "
            f"{cell_text(live.get('correctness_accuracy'), True)} of the "
            f"{cell_text(live.get('correctness_pairs'))} where one sample is right and the other "
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
        (f"member {k} (seed {cell_text(m.get('seed'))})", m, False)
        for k, m in enumerate(ens.get("members") or [])
    ]
    for mode, m in (ens.get("modes") or {}).items():
        lam = f" (lambda {cell_text(m.get('lambda'))})" if m.get("lambda") is not None else ""
        rows.append((f"ensemble {mode}{lam}", m, used == mode))
    if ens.get("warm"):
        rows.append(("WARM (weight average)", ens["warm"], used == "warm"))
    cells = [
        [name, cell_text(m.get("accuracy"), True),
         cell_text((m.get("by_category") or {}).get("wrong_answer"), True), m.get("pairs"),
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
        return not_available()
    cols = ("win", "tie", "loss")
    vals = {name: [finite(r.get(c)) or 0.0 for c in cols] for name, r in judges}
    rows = [[name, *(cell_text(r.get(c), True) for c in cols), r.get("n")] for name, r in judges]
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
        d, kl = finite(r.get("d")), finite(r.get("kl"))
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
        return not_available()
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
        d, kl, step = finite(r.get("d")), finite(r.get("kl")), finite(r.get("step"))
        d = math.sqrt(max(kl, 0.0)) if d is None and kl is not None else d
        if d is not None:
            step = int(step) if step is not None and step.is_integer() else step
            points.append({"step": step, "d": d, "gold": finite(r.get("gold"))})
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
    at = f"step {cell_text(best['step'])}, " if best["step"] is not None else ""
    where = f"({at}d = {best['d']:.3f}, gold {best['gold']:.3f})"
    if d_star is None:
        fit = ""
    elif math.isinf(d_star):
        fit = "; Gao's fit never turns down (no finite peak d*)"
    else:
        beyond = ", beyond the run's final d" if d_star > last["d"] else ""
        fit = f"; Gao's fit puts the peak at d* = {d_star:.3f}{beyond}"
    end = f"step {cell_text(last['step'])}, " if last["step"] is not None else ""
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
        return not_available()
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
