"""``rlhfkit cai revise``: Constitutional AI's supervised stage, critique then revision.

For each prompt (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"):

1. the model answers the prompt;
2. for each of ``--rounds`` rounds, a principle is drawn uniformly from the constitution (seeded
   by the run's seed and the prompt's position, so a rerun draws the same), and the model is
   asked, in the same conversation, for a critique of its last answer under the principle's
   critique request, then for a revision under its revision request;
3. the last revision is the final answer.

Every request of a stage goes to the backend in one batch (the local model or any
OpenAI-compatible endpoint, as the LLM judge uses). Written under ``--output`` (a directory):

- ``steps.jsonl``: per prompt, the initial answer and every round (principle, critique request,
  critique, revision request, revision);
- ``sft.jsonl``: ``sft`` rows, the prompt and the final revision (to fine-tune on);
- ``pairs.jsonl``: ``preference`` rows, the final revision chosen over the initial answer, with
  the principles that produced it.

Prompts are processed ``--chunk`` at a time and each chunk's rows are appended once it is
complete, so running the same command again continues after the last complete chunk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.constitution import Constitution, Principle, load_constitution
from rlhfkit.data.messages import parse_prompt
from rlhfkit.data.sources import DataError, load_rows
from rlhfkit.errors import ConfigError
from rlhfkit.rewards.chat import ChatBackend, load_backend

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
OUTPUTS = ("steps.jsonl", "sft.jsonl", "pairs.jsonl")
"""The files ``rlhfkit cai revise`` writes under ``--output``."""


@dataclass
class CAIReviseConfig:
    """rlhfkit cai revise: critiques and revisions under a constitution (SFT and pair data)."""

    prompts: str = "builtin:instructions"
    """Prompt source: a .jsonl/.json/.parquet/.csv file (a 'prompt' string or 'messages'
    list per row; a conversation's prompt is what precedes its last assistant reply) or
    builtin:NAME."""
    split: str = "train"
    """Split of a built-in or hub source."""
    limit: int | None = 32
    """Use only the first N prompts (None: all)."""
    constitution: str = "default"
    """The principles: 'default' (shipped) or a .yaml/.json file."""
    model: str = "smollm2-135m-instruct"
    """The model that answers, critiques and revises: a model name or path, or
    openai:<base_url>#<model> for an OpenAI-compatible endpoint."""
    rounds: int = 1
    """Critique-revision rounds per prompt (a new principle each round)."""
    max_tokens: int = 256
    """Tokens of each answer, critique and revision."""
    temperature: float = 0.0
    """Sampling temperature of the model (0: greedy)."""
    seed: int = 0
    """Seed of the principle draws."""
    chunk: int = 16
    """Prompts per batch; outputs are appended after each complete chunk."""
    output: str = "runs/cai"
    """Directory for steps.jsonl, sft.jsonl and pairs.jsonl."""
    backend_options: dict[str, str] = field(default_factory=dict)
    """Extra options of the backend (e.g. api_key_env for an endpoint)."""

    def problems(self) -> list[tuple[str, str]]:
        """Counts below their minimum."""
        out = [
            (name, f"must be at least 1, got {getattr(self, name)}")
            for name in ("rounds", "max_tokens", "chunk")
            if getattr(self, name) < 1
        ]
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be at least 1 (or None), got {self.limit}"))
        if self.temperature < 0:
            out.append(("temperature", f"must be >= 0, got {self.temperature}"))
        return out


def load_prompts(source: str, split: str, limit: int | None) -> list[Messages]:
    """Prompt conversations of ``source`` (a ``prompt`` string, or messages)."""
    out = []
    for row in load_rows(source, split=split):
        data = row.data
        if isinstance(data.get("prompt"), str):
            out.append([{"role": "user", "content": data["prompt"]}])
        elif "prompt" in data:
            out.append(parse_prompt(data["prompt"], "prompt", row.location))
        elif isinstance(data.get("messages"), list):
            messages = [m for m in data["messages"] if isinstance(m, dict)]
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                       default=len(messages))  # fmt: skip
            out.append(parse_prompt(messages[:last], "messages", row.location))
        else:
            raise DataError(row.location, "prompt", "expected a string or a list of messages")
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"--prompts {source}: no prompts")
    return out


def critique_and_revise(
    backend: ChatBackend,
    prompts: list[Messages],
    constitution: Constitution,
    *,
    rounds: int = 1,
    seed: int = 0,
    start: int = 0,
    max_tokens: int = 256,
    temperature: float = 0.0,
) -> list[dict[str, Any]]:
    """Steps 1-3 for ``prompts`` (prompt ``i`` is number ``start + i`` of the run).

    Returns:
        Per prompt: ``prompt``, ``initial``, ``final`` and ``rounds`` (each with ``principle``,
        ``critique_request``, ``critique``, ``revision_request``, ``revision``).
    """

    def ask(chats: list[Messages]) -> list[str]:
        replies = backend.complete(chats, max_tokens=max_tokens, temperature=temperature)
        return [r.strip() for r in replies]

    answers = ask([list(p) for p in prompts])
    records = [
        {"prompt": p, "initial": a, "rounds": []} for p, a in zip(prompts, answers, strict=True)
    ]
    for r in range(rounds):
        principles: list[Principle] = [
            constitution.draw(seed, (start + i) * rounds + r) for i in range(len(prompts))
        ]
        chats = [
            [*p, {"role": "assistant", "content": a}, {"role": "user", "content": pr.critique}]
            for p, a, pr in zip(prompts, answers, principles, strict=True)
        ]
        critiques = ask(chats)
        chats = [
            [*chat, {"role": "assistant", "content": c}, {"role": "user", "content": pr.revision}]
            for chat, c, pr in zip(chats, critiques, principles, strict=True)
        ]
        answers = ask(chats)
        for record, pr, c, a in zip(records, principles, critiques, answers, strict=True):
            record["rounds"].append({
                "principle": pr.name, "critique_request": pr.critique, "critique": c,
                "revision_request": pr.revision, "revision": a,
            })  # fmt: skip
    for record, a in zip(records, answers, strict=True):
        record["final"] = a
    return records


def output_rows(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows one record adds to each output file (``steps``, ``sft``, ``pairs``)."""
    principles = [r["principle"] for r in record["rounds"]]
    prompt = record["prompt"]
    return {
        "steps.jsonl": record,
        "sft.jsonl": {"messages": [*prompt, {"role": "assistant", "content": record["final"]}],
                      "principles": principles},
        "pairs.jsonl": {"prompt": prompt, "chosen": record["final"],
                        "rejected": record["initial"], "principles": principles},
    }  # fmt: skip


def _done(out: Path) -> int:
    """Prompts already written; the files are trimmed to the complete rows all of them have.

    The three files are appended one after the other, so a killed run can leave one longer
    than another, or a line cut short (the text after the last newline).
    """
    texts = {}
    for name in OUTPUTS:
        path = out / name
        texts[name] = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = {name: text.split("\n")[:-1] for name, text in texts.items()}
    done = min(len(v) for v in lines.values())
    for name, kept in lines.items():
        if texts[name] and (len(kept) != done or not texts[name].endswith("\n")):
            (out / name).write_text("".join(x + "\n" for x in kept[:done]), encoding="utf-8")
    return done


def output_dir(path: str, option: str = "--output") -> Path:
    """``path`` as a directory, created if needed.

    Raises:
        ConfigError: It cannot be created (naming ``option``).
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {path}: cannot create the directory ({err})") from err
    return out


def main(cfg: CAIReviseConfig) -> Path:
    """Generate the critiques and revisions; returns the output directory."""
    constitution = load_constitution(cfg.constitution)
    prompts = load_prompts(cfg.prompts, cfg.split, cfg.limit)
    out = output_dir(cfg.output)
    start = _done(out)
    if start >= len(prompts):
        log.info("all %d prompts are done in %s", len(prompts), out)
        return out
    if start:
        log.info("continuing after %d prompts already in %s", start, out)
    backend = load_backend(cfg.model, **cfg.backend_options)
    for first in range(start, len(prompts), cfg.chunk):
        part = prompts[first : first + cfg.chunk]
        records = critique_and_revise(
            backend, part, constitution, rounds=cfg.rounds, seed=cfg.seed, start=first,
            max_tokens=cfg.max_tokens, temperature=cfg.temperature,
        )  # fmt: skip
        rows = [output_rows(r) for r in records]
        for name in OUTPUTS:
            with (out / name).open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r[name]) + "\n" for r in rows))
        log.info("%d / %d prompts", first + len(part), len(prompts))
    return out
