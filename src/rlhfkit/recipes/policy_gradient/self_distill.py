"""Self-distillation: the policy as its own teacher, given privileged context.

``--algo.teacher self``: on-policy self-distillation in the manner of SDPO / OPSD.

The teacher is the policy's own network reading the prompt with extra context the student does
not see, then the student's completion; its log-probs of the student's tokens replace an
external teacher's in on-policy distillation's per-token advantage
(:func:`rlhfkit.recipes.policy_gradient.advantages.add_teacher_advantages`). The context
(``--algo.self-context``):

- ``answer``: the row's reference answer (its ``answer``, ``reference`` or ``solution`` field);
- ``sibling``: a correct completion of the same prompt by another sample of the group, drawn
  uniformly (seeded) among those whose reward reaches ``--algo.pass-threshold``, never the
  completion itself.

Completions without a context (no answer field, or no correct sibling) get no teacher term.
The teacher's weights (``--algo.self-teacher``): ``frozen`` (the starting model), ``live`` (the
current policy, under no_grad) or ``ema`` (an exponential moving average of the policy,
theta_T <- theta_T + alpha (theta - theta_T) in fp32 after each rollout batch's update, alpha =
``--algo.self-ema``; a resumed run restarts the average from the resumed policy).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from typing import Any

import torch

from rlhfkit.data.rollouts import rollout_micro_batches
from rlhfkit.data.templates import render_prompt
from rlhfkit.models.forward import completion_logprobs
from rlhfkit.models.sharding import gathered
from rlhfkit.recipes.policy_gradient.state import PGRun, RolloutBatch, Sampled
from rlhfkit.training.context import RunContext

PRIVILEGED = "{question}\n\nA correct solution:\n{context}\n\nNow solve the original question."
"""How the teacher's prompt adds the context to the last user message."""

ANSWER_FIELDS = ("answer", "reference", "solution")
"""Row fields read as the reference answer, in this order."""


def answer_context(fields: dict[str, Any]) -> str | None:
    """The row's reference answer, or None."""
    for name in ANSWER_FIELDS:
        value = fields.get(name)
        if value not in (None, ""):
            return str(value)
    return None


def sibling_choice(
    rewards: torch.Tensor, prompt: int, sample: int, threshold: float, rng: random.Random
) -> int | None:
    """A uniformly drawn correct sibling of completion ``sample`` of ``prompt``, or None.

    Shapes:
        rewards: (P, G) fp64, NaN where skipped.
    """
    row = rewards[prompt].tolist()
    correct = [j for j, r in enumerate(row) if j != sample and r == r and r >= threshold]
    return rng.choice(correct) if correct else None


def teacher_prompt(tokenizer: Any, messages: list[dict[str, Any]], context: str) -> list[int]:
    """The teacher's prompt ids: the conversation with the context added to its last user turn."""
    messages = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last]["content"] = PRIVILEGED.format(
        question=messages[last]["content"], context=context
    )
    return render_prompt(tokenizer, messages)


def contexts(run: PGRun, sampled: Sampled, step: int) -> list[str | None]:
    """Each completion's privileged context (None: no teacher term for it), in rollout order."""
    algo, rollout = run.cfg.algo, sampled.rollout
    g = sampled.rewards.shape[1]
    rng = random.Random(run.cfg.loop.seed * 1_000_003 + step)
    out: list[str | None] = []
    for row in range(len(rollout.completion_ids)):
        prompt, sample = rollout.prompt_index[row], row % g
        if algo.self_context == "answer":
            out.append(answer_context(sampled.prompts[prompt].fields))
            continue
        j = sibling_choice(sampled.rewards, prompt, sample, algo.pass_threshold, rng)
        out.append(None if j is None else sampled.texts[prompt * g + j])
    return out


class SelfTeacher:
    """The policy's network as its own teacher: frozen, live or an EMA.

    ``frozen`` is the starting model: under LoRA the policy with its adapter disabled for each
    teacher pass only; otherwise one frozen copy, loaded at the first pass. ``ema`` keeps fp32
    shadow weights, started from the policy at the first pass (so a resumed run starts the
    average from the resumed policy) and moved after each rollout batch's update by
    theta_T <- theta_T + alpha (theta - theta_T); a compute-dtype copy of the network runs them.

    Args:
        ctx: The run (its policy, tokenizer and starting model).
        mode: ``frozen``, ``live`` or ``ema``.
        alpha: The EMA's step size.
    """

    def __init__(self, ctx: RunContext, mode: str, alpha: float) -> None:
        self.ctx, self.mode, self.alpha = ctx, mode, alpha
        self._stack = contextlib.ExitStack()
        self.model: torch.nn.Module | None = None
        self.shadow: list[torch.Tensor] = []

    @property
    def _lora(self) -> bool:
        return getattr(self.ctx.model, "disable_adapter", None) is not None

    @contextlib.contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        """The teacher's network for one no-grad pass (whole while it runs under FSDP2)."""
        if self.mode == "frozen" and self._lora:
            with self.ctx.starting_model() as model:  # the adapter is off for this pass only
                yield model
            return
        if self.mode == "frozen" and self.model is None:
            self.model = self._stack.enter_context(self.ctx.starting_model())
        if self.mode == "ema" and self.model is None:
            self.model = copy.deepcopy(self.ctx.model).eval().requires_grad_(False)
            self.shadow = [p.detach().float().clone() for p in self.ctx.model.parameters()]
        model = self.ctx.model if self.model is None else self.model
        with gathered(model):
            yield model

    @torch.no_grad()
    def update(self) -> None:
        """After a rollout batch's update: move the EMA towards the policy (no-op otherwise)."""
        if self.mode != "ema" or self.model is None:
            return
        teacher = self.model.parameters()
        for shadow, t, p in zip(self.shadow, teacher, self.ctx.model.parameters(), strict=True):
            shadow.lerp_(p.detach().float(), self.alpha)
            t.copy_(shadow)

    def close(self) -> None:
        """Free a frozen copy."""
        self._stack.close()


@torch.no_grad()
def attach_self_teacher(run: PGRun, teacher: SelfTeacher, batch: RolloutBatch, step: int) -> None:
    """Set ``teacher_logprobs`` and ``teacher_rows`` on every micro-batch of ``batch``.

    The teacher reads each completion after its privileged prompt; completions without a
    context are left out of the teacher term (``teacher_rows`` False).
    """
    ctx, sampled = run.ctx, batch.sampled
    found = contexts(run, sampled, step)
    messages = [p.fields["prompt"] for p in sampled.prompts]
    with teacher.network() as model:
        was_training = model.training
        model.eval()
        for b in batch.batches:
            rows = b.rows.tolist()
            lengths = b.mask.sum(-1).tolist()
            logprobs = torch.zeros(b.mask.shape, dtype=torch.float32, device=b.mask.device)
            keep = torch.tensor([found[r] is not None for r in rows], device=b.mask.device)
            with_context = [i for i, r in enumerate(rows) if found[r] is not None]
            if with_context:
                prompts = [
                    teacher_prompt(
                        ctx.tokenizer,
                        _chat(messages[sampled.rollout.prompt_index[rows[i]]]),
                        found[rows[i]],
                    )
                    for i in with_context
                ]
                comps = [
                    sampled.rollout.completion_ids[rows[i]][: lengths[i]] for i in with_context
                ]
                zeros = [[0.0] * len(c) for c in comps]
                for part in rollout_micro_batches(prompts, comps, zeros, ctx.pad_id, 1 << 30):
                    part = {k: v.to(b.mask.device) for k, v in part.items()}
                    lp = completion_logprobs(
                        model, part["prompt_ids"], part["prompt_mask"], part["completion_ids"],
                        part["completion_mask"], temperature=run.temperature,
                    )  # fmt: skip
                    for k, local in enumerate(part["rows"].tolist()):
                        i = with_context[local]
                        logprobs[i, : lengths[i]] = lp[k, : lengths[i]].float()
            b.teacher_logprobs, b.teacher_rows = logprobs, keep
        model.train(was_training)


def _chat(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages (a plain string is one user turn)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
