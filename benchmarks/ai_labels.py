"""How good is the embedded 135M model as an AI labeller? Agreement with the gold judge, measured.

Pairs: the first ``--pairs`` held-out pairs of ``builtin:preferences`` (a reference reply
against one of five kinds of worse reply; the gold judge prefers the reference), each shown
with a seeded random order so that a judge that always picks one position scores 50%.

Labellers, each on the same pairs:

- ``ai_classic``: RLAIF under the default constitution (a principle drawn per pair, both orders,
  inconsistent pairs dropped), the embedded model loaded in this process, the verdict read as
  P(A) vs P(B) after "The answer is: (" (also: agreement of the soft label's side, all pairs);
- ``ai_direct``: the same with the generative verdict (the judge writes ``[[A]]``/``[[B]]``);
- ``ai_endpoint``: the generative verdict through ``rlhfkit serve`` (an OpenAI-compatible
  server started here), with verdict log-probs, so soft labels too;
- ``rubric``: the shipped rubric ``builtin:instructions`` (deterministic rules, no model).

Reported per labeller: the share of pairs that got a label (kept), agreement with gold among
them, agreement over all pairs (a dropped pair counts as wrong), consistency across orders,
position bias, unparseable answers and seconds. Figures are printed as ``BENCH ai_labels.<name>
<value>`` and written to ``benchmarks/results/ai_labels-<UTC time>.json``.

    python benchmarks/ai_labels.py [--pairs 48] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import common
from rlhfkit.data.constitution import load_constitution
from rlhfkit.data.sources import load_rows
from rlhfkit.rewards.ai_labels import label_pairs
from rlhfkit.rewards.chat import LocalChatBackend, OpenAIChatBackend
from rlhfkit.rewards.rubric import rubric_preferences, rubric_reward

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    """A free local TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int) -> subprocess.Popen:
    """``rlhfkit serve`` on ``port``, once it answers."""
    command = [sys.executable, "-m", "rlhfkit", "serve", "--port", str(port)]
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=ROOT, stdout=quiet, stderr=quiet)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close()
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("rlhfkit serve did not start")


def score(preferred: list[str | None], gold_first: list[bool]) -> dict[str, float]:
    """Kept share and agreement with gold (``gold_first[i]``: gold prefers reply a)."""
    kept = [(p, g) for p, g in zip(preferred, gold_first, strict=True) if p is not None]
    right = sum((p == "a") == g for p, g in kept)
    return {
        "kept": len(kept) / len(preferred),
        "agreement_kept": right / len(kept) if kept else 0.0,
        "agreement_all": right / len(preferred),
    }


def main(argv: list[str] | None = None) -> None:
    """Label the pairs three ways and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per judge answer")
    args = parser.parse_args(argv)
    report = common.Reporter("ai_labels")
    report.details["environment"] = common.environment()
    report.details["args"] = vars(args)
    rows = [r.data for r in load_rows("builtin:preferences", split="heldout")][: args.pairs]
    rng = random.Random(0)
    gold_first = [rng.random() < 0.5 for _ in rows]
    a = [r["chosen"] if g else r["rejected"] for r, g in zip(rows, gold_first, strict=True)]
    b = [r["rejected"] if g else r["chosen"] for r, g in zip(rows, gold_first, strict=True)]
    prompts = [r["prompt"] for r in rows]
    constitution = load_constitution()
    results: dict[str, Any] = {}

    local = LocalChatBackend(MODEL)
    start = time.perf_counter()
    classic = label_pairs(local, prompts, a, b, constitution, mode="classic")
    soft_right = [
        (s > 0.5) == g for s, g in zip(classic.soft or [], gold_first, strict=True) if s != 0.5
    ]
    results["ai_classic"] = {**classic.metrics(), **score(classic.preferred, gold_first),
                             "soft_agreement_all": sum(soft_right) / len(rows),
                             "seconds": time.perf_counter() - start}  # fmt: skip
    start = time.perf_counter()
    direct = label_pairs(local, prompts, a, b, constitution, max_tokens=args.max_tokens,
                         mode="generative")  # fmt: skip
    results["ai_direct"] = {**direct.metrics(), **score(direct.preferred, gold_first),
                            "seconds": time.perf_counter() - start}  # fmt: skip

    port = free_port()
    server = serve(port)
    try:
        start = time.perf_counter()
        endpoint = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", MODEL, api_key_env=None,
                                     timeout=600, concurrency=1)  # fmt: skip
        via = label_pairs(endpoint, prompts, a, b, constitution, max_tokens=args.max_tokens,
                          mode="generative")  # fmt: skip
        soft = [s for s in via.soft or [] if s is not None]
        results["ai_endpoint"] = {**via.metrics(), **score(via.preferred, gold_first),
                                  "soft_labels": len(soft),
                                  "seconds": time.perf_counter() - start}  # fmt: skip
        same = sum(x == y for x, y in zip(via.preferred, direct.preferred, strict=True))
        results["ai_endpoint"]["same_labels_as_direct"] = same / len(rows)
    finally:
        server.terminate()
        server.wait()

    start = time.perf_counter()
    fields = [{k: r[k] for k in ("prompt", "reference", "task")} for r in rows]
    labels = rubric_preferences(rubric_reward("rubric:builtin:instructions"), fields, a, b)
    preferred = [None if x is None or x == 0.5 else "a" if x == 1.0 else "b" for x in labels]
    results["rubric"] = {**score(preferred, gold_first), "seconds": time.perf_counter() - start}

    for name, values in results.items():
        for key, value in values.items():
            if isinstance(value, int | float) and value == value:  # NaN left out
                report.figure(f"{name}.{key}", float(value))
    shown = zip(direct.principles[:4], direct.outputs[:4], strict=True)
    report.details["examples"] = [{"principle": p.name, "outputs": o} for p, o in shown]
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
