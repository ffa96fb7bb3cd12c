r"""Rubric rewards: a reply graded on weighted criteria, by rules or by a judge model.

Each criterion k of a rubric (:mod:`rlhfkit.data.rubric`) gets a score s_k in [0, 1]: for a
quality (w_k > 0), 1 when the reply has it; for a pitfall (w_k < 0), 1 when the problem occurred.
The reward is the weighted sum over the positive weights' total (:func:`rubric_score`)::

    R = sum_k w_k s_k / sum_{k: w_k > 0} w_k          in [-sum|w_neg| / sum w_pos, 1]

clamped to [0, 1] by default. The book gives no aggregation rule; this one makes "every quality
and no pitfall" exactly 1 and lets each pitfall cost its weight.

Two ways of scoring:

- **explicit** (default): each criterion on its own. A criterion with a ``check`` is decided by
  a deterministic rule (:data:`RULES`, or a parametrised rule such as ``max_words:40``,
  ``regex:<pattern>``, ``contains:<text>``, ``verifier:<name>``: reward > 0). A criterion
  without one is put to the judge model as a yes/no question; its answer ends with ``[[YES]]``
  or ``[[NO]]``. Every judge question of a batch goes to the backend in one call.
- **implicit**: one holistic judge call per reply: the whole rubric is shown and the judge rates
  the reply 1-10; R = (rating - 1) / 9.

A reply with an unparseable judge answer gets no reward (None: skipped) and is counted in
``unparseable``. As a reward, a rubric is named ``rubric:<rubric file or builtin:<name>>``,
optionally followed by ``|judge:<model>`` (or ``|judge:openai:<url>#<model>``) and ``|implicit``.
:func:`generate_checklists` asks a model to write a rubric for each prompt (checklist rewards);
:func:`rubric_preferences` labels pairs by their rubric scores.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.rubric import Criterion, Rubric, RubricSet, load_rubrics
from rlhfkit.data.tasks import preferences as task
from rlhfkit.rewards.chat import ChatBackend, load_backend
from rlhfkit.rewards.judge import (
    Prompt,
    complete_checked,
    conversation_block,
    parse_rating,
    section_block,
)

RuleFn = Callable[[str, Mapping[str, Any]], bool]
"""A deterministic check: ``(completion, example fields) -> met?``."""


def rubric_score(weights: Sequence[float], scores: Sequence[float], *, clamp: bool = True) -> float:
    """R = sum_k w_k s_k / sum_{w_k > 0} w_k, clamped to [0, 1] when ``clamp``.

    Args:
        weights: w_k, non-zero; at least one positive.
        scores: s_k in [0, 1] (for a pitfall, 1 = it occurred).
        clamp: Clip R to [0, 1].

    Raises:
        ValueError: Different lengths, a score outside [0, 1], or no positive weight.
    """
    if len(weights) != len(scores):
        raise ValueError(f"{len(weights)} weights but {len(scores)} scores")
    if any(not 0.0 <= s <= 1.0 for s in scores):
        raise ValueError(f"criterion scores must lie in [0, 1]: {list(scores)}")
    positive = sum(w for w in weights if w > 0)
    if positive <= 0:
        raise ValueError("a rubric needs at least one positive weight")
    value = sum(w * s for w, s in zip(weights, scores, strict=True)) / positive
    return min(1.0, max(0.0, value)) if clamp else value


# --- Deterministic rules ------------------------------------------------------------------------


def _reference(fields: Mapping[str, Any]) -> str:
    value = fields.get("reference")
    if value is None:
        raise ValueError("this rubric rule needs the example's 'reference' field")
    return str(value)


def _repeats(completion: str, fields: Mapping[str, Any]) -> bool:
    """A non-trivial line or sentence (4+ words) that occurs twice."""
    pieces = [p.strip().lower() for p in re.split(r"[\n.!?]+", completion)]
    pieces = [p for p in pieces if len(p.split()) >= 4]
    return len(pieces) != len(set(pieces))


RULES: dict[str, RuleFn] = {
    "correct": lambda c, f: task.answer_is_correct(c, _reference(f), f.get("task")),
    "mentions_answer": lambda c, f: task.mentions_answer(c, _reference(f), f.get("task")),
    "answer_line": lambda c, f: task.has_answer_line(c),
    "concise": lambda c, f: task.within_word_budget(c, _reference(f)),
    "house_format": lambda c, f: task.has_house_format(c),
    "repeats": _repeats,
    "nonempty": lambda c, f: bool(c.strip()),
}
"""Named rules (the built-in task's ``correct``, ``mentions_answer``, ``concise`` read the
example's ``reference`` and ``task``)."""


def _verifier_rule(name: str) -> RuleFn:
    from rlhfkit.rewards.fields import accepted_fields
    from rlhfkit.rewards.verifiers import get_verifier, verify

    fn = verify if name == "auto" else get_verifier(name)
    return lambda c, f: (fn(c, **accepted_fields(fn, dict(f))) or 0.0) > 0.0


def _regex_rule(pattern: str) -> RuleFn:
    compiled = re.compile(pattern)
    return lambda c, f: compiled.search(c) is not None


_PARAMETRISED: dict[str, Callable[[str], RuleFn]] = {
    "max_words": lambda n: lambda c, f: len(c.split()) <= int(n),
    "min_words": lambda n: lambda c, f: len(c.split()) >= int(n),
    "regex": _regex_rule,
    "contains": lambda text: lambda c, f: text.casefold() in c.casefold(),
    "verifier": _verifier_rule,
}


def rule(check: str) -> RuleFn:
    """The rule a criterion's ``check`` names: a name of :data:`RULES` or ``<kind>:<argument>``.

    Raises:
        ValueError: An unknown rule, or a bad argument (naming the check).
    """
    if check in RULES:
        return RULES[check]
    kind, sep, argument = check.partition(":")
    if not sep or kind not in _PARAMETRISED:
        names = ", ".join([*RULES, *(f"{k}:<arg>" for k in _PARAMETRISED)])
        raise ValueError(f"rubric check {check!r}: unknown rule (known: {names})")
    try:
        if kind in ("max_words", "min_words"):
            int(argument)
        return _PARAMETRISED[kind](argument)
    except (ValueError, KeyError, re.error) as err:
        raise ValueError(f"rubric check {check!r}: {err}") from None


# --- Judge prompts ------------------------------------------------------------------------------

CRITERION_SYSTEM = (
    "You are a careful grader. You are shown a conversation, the assistant's reply to the "
    "user's last message and one criterion. Decide whether the reply meets the criterion (for "
    "a problem: whether the reply shows it). Judge this criterion only. Explain in one "
    "sentence, then end with [[YES]] or [[NO]]."
)
HOLISTIC_SYSTEM = (
    "You are a careful grader. You are shown a conversation, the assistant's reply to the "
    "user's last message and a rubric: qualities with positive weights and problems with "
    "negative weights. Rate how well the reply does on the rubric as a whole, from 1 (meets "
    "nothing, or shows the worst problems) to 10 (meets every quality, shows no problem). "
    "Explain briefly, then end with the rating as [[rating]], for example [[6]]."
)
_YES_NO = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)


def parse_yes_no(text: str) -> float | None:
    """1.0 for a final ``[[YES]]``, 0.0 for ``[[NO]]`` (the last one counts), else None."""
    matches = _YES_NO.findall(text)
    return None if not matches else float(matches[-1].upper() == "YES")


def _context(prompt: Prompt, reply: str, reference: str | None) -> list[str]:
    parts = [conversation_block(prompt)]
    if reference is not None:
        parts.append(section_block("Reference answer", reference))
    return [*parts, section_block("Reply of the assistant", reply)]


def criterion_messages(
    prompt: Prompt, reply: str, criterion: Criterion, reference: str | None = None
) -> list[dict[str, str]]:
    """The judge's chat for one criterion of one reply (a yes/no question)."""
    ask = "Does the reply show this problem?" if criterion.pitfall else "Does the reply meet it?"
    kind = "Problem" if criterion.pitfall else "Criterion"
    text = f"{kind}: {criterion.title}: {criterion.description}\n{ask} Answer [[YES]] or [[NO]]."
    return [
        {"role": "system", "content": CRITERION_SYSTEM},
        {"role": "user", "content": "\n\n".join([*_context(prompt, reply, reference), text])},
    ]


def holistic_messages(
    prompt: Prompt, reply: str, rubric: Rubric, reference: str | None = None
) -> list[dict[str, str]]:
    """The judge's chat for rating one reply on a whole rubric (implicit scoring)."""
    items = "\n".join(f"- ({c.weight:+g}) {c.title}: {c.description}" for c in rubric.criteria)
    ask = "Rate the reply from 1 to 10 as [[rating]]."
    return [
        {"role": "system", "content": HOLISTIC_SYSTEM},
        {"role": "user", "content": "\n\n".join(
            [*_context(prompt, reply, reference), section_block("Rubric", items), ask])},
    ]  # fmt: skip


# --- The reward ---------------------------------------------------------------------------------


@dataclass
class RubricGrade:
    """One reply's grade: per-criterion scores (None: unparseable) and the reward (None: skip)."""

    rubric: Rubric
    scores: list[float | None]
    reward: float | None


class RubricReward:
    """A rubric as a batched reward function (see the module docstring).

    Args:
        rubrics: The rubric file's rubrics (each example may carry its own ``rubric``).
        backend: The judge for criteria without a ``check`` (and for implicit scoring).
        mode: ``explicit`` (criterion by criterion) or ``implicit`` (one holistic rating).
        max_tokens: Tokens the judge may write per answer.
        clamp: Clip rewards to [0, 1].
        reference_field: The example field shown to the judge as the reference answer.

    Raises:
        ValueError: An unknown mode or rule, or a criterion that needs a judge when none is
            given.
    """

    def __init__(
        self,
        rubrics: RubricSet,
        backend: ChatBackend | None = None,
        *,
        mode: str = "explicit",
        max_tokens: int = 128,
        clamp: bool = True,
        reference_field: str | None = "reference",
    ) -> None:
        if mode not in ("explicit", "implicit"):
            raise ValueError(f"rubric mode {mode!r}: expected explicit or implicit")
        self.rubrics, self.backend, self.mode = rubrics, backend, mode
        self.max_tokens, self.clamp, self.reference_field = max_tokens, clamp, reference_field
        self.scored = self.unparseable = 0
        self._rules: dict[str, RuleFn] = {}
        for rubric in [rubrics.default, *rubrics.tasks.values()]:
            if rubric is not None:
                self._check(rubric)

    def _check(self, rubric: Rubric) -> None:
        """Resolve the rules and make sure a judge is there for what needs one."""
        judged = self.mode == "implicit" or any(c.check is None for c in rubric.criteria)
        if judged and self.backend is None:
            names = [c.title for c in rubric.criteria if c.check is None]
            what = "implicit scoring" if self.mode == "implicit" else f"criteria {names}"
            raise ValueError(f"rubric {rubric.source}: {what} need a judge; name one with "
                             "rubric:<file>|judge:<model>")  # fmt: skip
        for c in rubric.criteria:
            if c.check is not None and c.check not in self._rules:
                self._rules[c.check] = rule(c.check)

    def grade(
        self, completions: Sequence[str], fields: Sequence[Mapping[str, Any]]
    ) -> list[RubricGrade]:
        """Grade every completion given its example's fields (one judge batch in all)."""
        if len(completions) != len(fields):
            raise ValueError(f"{len(completions)} completions but {len(fields)} field sets")
        rubrics = []
        for i, f in enumerate(fields):
            rubric = self.rubrics.for_example(f, where=f"example {i}")
            if "rubric" in f:
                self._check(rubric)
            rubrics.append(rubric)
        grades = [RubricGrade(r, [None] * len(r.criteria), None) for r in rubrics]
        asks, chats = self._questions(completions, fields, grades)
        if chats:
            assert self.backend is not None
            answers = complete_checked(self.backend, chats, self.max_tokens)
            for (i, k), text in zip(asks, answers, strict=True):
                if k < 0:
                    rating = parse_rating(text)
                    grades[i].reward = None if rating is None else (rating - 1.0) / 9.0
                else:
                    grades[i].scores[k] = parse_yes_no(text)
        for g in grades:
            if self.mode == "explicit" and all(s is not None for s in g.scores):
                scores = [float(s) for s in g.scores]  # type: ignore[arg-type]
                g.reward = rubric_score(g.rubric.weights, scores, clamp=self.clamp)
        self.scored += len(grades)
        self.unparseable += sum(g.reward is None for g in grades)
        return grades

    def _questions(
        self,
        completions: Sequence[str],
        fields: Sequence[Mapping[str, Any]],
        grades: list[RubricGrade],
    ) -> tuple[list[tuple[int, int]], list[list[dict[str, str]]]]:
        """Apply the rules; return the judge's questions as (completion, criterion) and chats.

        The criterion index is -1 for an implicit (holistic) rating.
        """
        asks: list[tuple[int, int]] = []
        chats = []
        for i, (c, f, g) in enumerate(zip(completions, fields, grades, strict=True)):
            ref = f.get(self.reference_field) if self.reference_field else None
            ref = None if ref is None else str(ref)
            if self.mode == "implicit":
                asks.append((i, -1))
                chats.append(holistic_messages(self._prompt(f, i), c, g.rubric, ref))
                continue
            for k, criterion in enumerate(g.rubric.criteria):
                if criterion.check is not None:
                    g.scores[k] = float(self._rules[criterion.check](c, f))
                else:
                    asks.append((i, k))
                    chats.append(criterion_messages(self._prompt(f, i), c, criterion, ref))
        return asks, chats

    @staticmethod
    def _prompt(fields: Mapping[str, Any], i: int) -> Prompt:
        prompt = fields.get("prompt")
        if prompt is None:
            raise ValueError(f"completion {i}: a rubric judge needs the example's 'prompt'")
        return prompt

    def score_batch(
        self, completions: Sequence[str], fields: Sequence[Mapping[str, Any]]
    ) -> list[float | None]:
        """The rubric rewards of ``completions`` (None where the judge's answer was unparseable)."""
        return [g.reward for g in self.grade(completions, fields)]

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """The reward of one completion (prefer :meth:`score_batch` for many)."""
        return self.score_batch([completion], [fields])[0]


def rubric_reward(spec: str, **backend_options: Any) -> RubricReward:
    """``rubric:<file or builtin:<name>>[|judge:<model>][|implicit]`` as a reward.

    Raises:
        ValueError: A malformed spec or an unknown option.
        MissingFileError, DataError: The rubric file is missing or malformed.
    """
    rubric_spec, judge, mode = parse_rubric_spec(spec)
    rubrics = load_rubrics(rubric_spec)
    backend = load_backend(judge, **backend_options) if judge else None
    return RubricReward(rubrics, backend, mode=mode)


def parse_rubric_spec(spec: str) -> tuple[str, str | None, str]:
    """``rubric:<rubric>[|judge:<model>][|implicit]`` as (rubric, judge or None, mode).

    Raises:
        ValueError: An empty rubric, an unknown option, or an option given twice.
    """
    rubric_spec, *options = spec.removeprefix("rubric:").split("|")
    judge = [o for o in options if o.startswith("judge:")]
    modes = [o for o in options if o in ("explicit", "implicit")]
    unknown = [o for o in options if o not in judge and o not in modes]
    if not rubric_spec or unknown or len(judge) > 1 or len(modes) > 1:
        raise ValueError(f"reward {spec!r}: expected rubric:<file or builtin:<name>>"
                         "[|judge:<model>][|implicit]")  # fmt: skip
    return rubric_spec, judge[0] if judge else None, modes[0] if modes else "explicit"


def rubric_problem(spec: str) -> str | None:
    """Why ``spec`` (a ``rubric:`` reward) cannot load, found without loading a judge.

    Checks the file, every criterion and rule, and that a judge is named where one is needed.
    """
    from rlhfkit.errors import UserError

    try:
        rubric_spec, judge, mode = parse_rubric_spec(spec)
        has_judge = judge is not None
        if mode == "implicit" and not has_judge:
            return f"reward {spec!r}: implicit scoring needs a judge: add |judge:<model>"
        rubrics = load_rubrics(rubric_spec)
        for rubric in [rubrics.default, *rubrics.tasks.values()]:
            for criterion in rubric.criteria if rubric is not None else ():
                if criterion.check is not None:
                    rule(criterion.check)
                elif not has_judge:
                    return (f"reward {spec!r}: criterion {criterion.title!r} has no check and "
                            "needs a judge: add |judge:<model>")  # fmt: skip
    except (UserError, ValueError) as err:
        text = str(err)
        return text if text.startswith("reward ") else f"reward {spec!r}: {text}"
    return None


# --- Checklists and labels ----------------------------------------------------------------------

CHECKLIST_SYSTEM = (
    "You write grading checklists. Given a user's request, list 7 to 20 criteria that a "
    "good reply meets, and the problems a bad reply shows. Write one per line, as "
    "'- [weight] Title: what is checked', with weight 5 (essential), 3 (important) or 1 "
    "(optional) for a quality, and -1 or -2 for a problem. Write nothing else."
)
_ITEM = re.compile(
    r"^\s*(?:[-*•]|\d+[.)])?\s*\[\s*([+-]?\d+(?:\.\d+)?)\s*\]\s*([^:\n]+?)\s*:\s*(.+?)\s*$"
)


def parse_checklist(text: str) -> list[Criterion]:
    """The ``- [weight] Title: description`` lines of a model's checklist (other lines ignored)."""
    items = []
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match and float(match.group(1)) != 0.0:
            items.append(Criterion(match.group(2), match.group(3), float(match.group(1))))
    return items


def generate_checklists(
    backend: ChatBackend, prompts: Sequence[Prompt], *, max_tokens: int = 512
) -> list[Rubric | None]:
    """A rubric per prompt written by ``backend`` (None where it wrote no usable one)."""
    chats = [
        [{"role": "system", "content": CHECKLIST_SYSTEM},
         {"role": "user", "content": conversation_block(p) + "\n\nWrite the checklist."}]
        for p in prompts
    ]  # fmt: skip
    out: list[Rubric | None] = []
    for i, text in enumerate(complete_checked(backend, chats, max_tokens)):
        items = parse_checklist(text)
        usable = any(c.weight > 0 for c in items)
        out.append(Rubric(tuple(items), f"checklist {i}") if usable else None)
    return out


def rubric_preferences(
    reward: RubricReward,
    fields: Sequence[Mapping[str, Any]],
    replies_a: Sequence[str],
    replies_b: Sequence[str],
) -> list[float | None]:
    """Pair labels from rubric scores: 1.0 (a better), 0.0 (b), 0.5 (equal), None (ungraded)."""
    n = len(fields)
    scores = reward.score_batch([*replies_a, *replies_b], [*fields, *fields])
    labels: list[float | None] = []
    for a, b in zip(scores[:n], scores[n:], strict=True):
        labels.append(None if a is None or b is None else 1.0 if a > b else 0.0 if b > a else 0.5)
    return labels
