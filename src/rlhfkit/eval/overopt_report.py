"""The page of ``rlhfkit overopt``: proxy and gold reward against sqrt(KL), per label budget.

Built from :mod:`rlhfkit.eval.html`; its data is documented in
:func:`render_overopt_report`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.eval.html import esc, figure_html, matplotlib_classes, table_html, write_page

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _budgetfigure_html(curves: list[dict[str, Any]], rl: bool) -> str:
    """Proxy (dotted) and gold (solid) reward against d, one colour per budget and proxy."""

    def draw(fig: Figure) -> None:
        ax_gold, ax_proxy = fig.subplots(1, 2)
        for c in curves:
            pts = c["points"]
            d = [p["d"] for p in pts]
            label = f"{c['budget']} pairs, {c['proxy']}"
            ax_gold.plot(d, [p["gold"] for p in pts], marker=".", label=label)
            ax_proxy.plot(d, [p["proxy"] for p in pts], marker=".", linestyle=":", label=label)
        for ax, what in ((ax_gold, "gold reward"), (ax_proxy, "proxy reward")):
            ax.set(xlabel="d = sqrt(KL(policy || start))", ylabel=what)
        ax_gold.set_title(("RL" if rl else "best-of-n") + ": gold")
        ax_proxy.set_title(("RL" if rl else "best-of-n") + ": proxy")
        ax_gold.legend(loc="best", fontsize="small")

    return figure_html(draw, "proxy and gold reward against sqrt(KL)", (10, 4.2))


def render_overopt_report(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``rlhfkit overopt``'s page: the curves per budget, Gao's fits and a table.

    ``data`` holds ``bon`` (``{"ns", "curves": [{"budget", "proxy", "points": [{"n", "d",
    "proxy", "gold", "gold_low", "gold_high"}], "gold_fit", "gold_peak_n", "gold_peak",
    "on_policy_accuracy", "heldout_accuracy"}]}``; the accuracies are the proxy's agreement with
    gold on the policy's own samples and its accuracy on the task's held-out pairs),
    ``rl`` (``{"runs": [{"budget", "proxy", "points": [{"step", "d", "proxy", "gold"}],
    "gold_fit", "gold_peak_step", "gold_peak_d", "final_d", "heldout": {"gold", "proxy"} or
    None}]}``; ``heldout`` is the final policy on the best-of-n prompts) and ``config``.

    Raises:
        MissingExtraError: When matplotlib (the ``plot`` extra) is not installed.
    """
    matplotlib_classes()
    bon, runs = data["bon"]["curves"], data.get("rl", {}).get("runs", [])
    body = [
        "<h1>Reward over-optimisation</h1>",
        "<p>Proxy reward models trained on gold-labelled pairs at several label budgets; the policy"
        " optimised against each by best-of-n (unbiased estimator over all samples) and by RL."
        " Every point is scored by the proxy and by the gold judge. Over-optimisation shows as a"
        " gold curve that peaks and falls while the proxy keeps rising.</p>",
        '<section id="bon"><h2>Best-of-n</h2>' + _budgetfigure_html(bon, rl=False),
    ]
    rows = []
    for c in bon:
        pts, fit = c["points"], c["gold_fit"] or {}
        held_out = (c.get("heldout_accuracy") or {}).get("all")
        rows.append([c["budget"], c["proxy"], held_out, c.get("on_policy_accuracy"),
                     pts[0]["gold"], c["gold_peak"], c["gold_peak_n"], pts[-1]["gold"],
                     pts[-1]["proxy"] - pts[0]["proxy"], fit.get("alpha"), fit.get("beta"),
                     fit.get("r2"), fit.get("d_star")])  # fmt: skip
    head = ["budget", "proxy", "held-out acc.", "on-policy acc.", "gold n=1", "gold peak",
            "peak n", "gold n=max", "proxy gain", "alpha", "beta", "R^2", "d*"]  # fmt: skip
    body.append(table_html(head, rows, text_cols=2) + "</section>")
    if runs:
        body.append('<section id="rl"><h2>RL</h2>' + _budgetfigure_html(runs, rl=True))
        rows = []
        for r in runs:
            pts, fit = r["points"], r["gold_fit"] or {}
            past = (r["final_d"] - fit["d_star"]) if fit.get("d_star") is not None else None
            rows.append([r["budget"], r["proxy"], pts[0]["gold"] if pts else None,
                         max((p["gold"] for p in pts if p["gold"] is not None), default=None),
                         r.get("gold_peak_step"), r.get("final_d"), fit.get("alpha"),
                         fit.get("beta"), fit.get("r2"), fit.get("d_star"), past,
                         (r.get("heldout") or {}).get("gold")])  # fmt: skip
        head = ["budget", "proxy", "gold start", "gold peak", "peak step", "final d", "alpha",
                "beta", "R^2", "d*", "final d - d*", "held-out gold at the end"]  # fmt: skip
        body.append(table_html(head, rows, text_cols=2) + "</section>")
    config = json.dumps(data.get("config", {}), indent=1, default=str)
    body.append(f"<section id='config'><h2>Configuration</h2><pre>{esc(config)}</pre></section>")
    return write_page("rlhfkit over-optimisation", body, path)
