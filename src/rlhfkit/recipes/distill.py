"""Knowledge distillation: ``rlhfkit distill`` (RLHF book ch. 12; GKD, Agarwal et al. 2024).

A student learns the teacher's per-token distributions along sequences that either the student
samples itself (on-policy) or that come from elsewhere (off-policy: the teacher's samples, or the
dataset's own completions). GKD's lambda is the share of on-policy batches; its beta picks the
divergence (0: forward KL(teacher || student), word-level KD; 1: reverse KL, on-policy
distillation's; between: the generalised JSD; :mod:`rlhfkit.losses.distill`).

Loop, for each optimiser step:
    1. Take the next ``batch_size`` prompts of a seeded per-epoch shuffle; each rank its share.
    2. With probability ``lmbda`` (drawn from the seed and the step, so a resumed run draws the
       same) the student samples one completion per prompt; otherwise the completions are the
       teacher's samples (``off_policy teacher``) or the rows' ``completion`` field
       (``off_policy dataset``).
    3. Pack prompt + completion into padding-free micro-batches, labels on the completion
       tokens (end-of-turn included).
    4. Loss: the divergence between the teacher's and the student's next-token distributions
       at every label position, fused with both output heads chunk by chunk (no full
       tokens x vocabulary block for both models at once), summed and divided by the global
       number of label tokens (token mean over the optimiser batch, whatever the micro-batch
       split); backward, clip, AdamW.
    5. Every ``eval_every`` steps and at the end: on fixed held-out sequences (the teacher's
       greedy completions of the held-out prompts, drawn once), the per-token forward and
       reverse KL and the agreement of the two models' most likely tokens.

The teacher is frozen, loaded in the compute dtype and placed like the KL reference (sharded
under ``--model.parallel fsdp2`` unless ``--model.shard-frozen false``). Teacher and student may
differ in size and architecture but must share a tokenizer (checked before any model loads).
Self-distillation (the student as its own teacher with privileged context) and on-policy
distillation as a policy-gradient preset are not part of this command.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, Problems, to_dict
from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.prompts import PromptRow, load_prompt_rows
from rlhfkit.data.sources import data_section_problems
from rlhfkit.errors import ConfigError
from rlhfkit.losses.distill import DistillLoss, distill_divergence_sum
from rlhfkit.models.forward import label_hidden
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.sharding import gathered
from rlhfkit.recipes.sft import label_count, micro_batches
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import chat_generator
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import RunContext, batch_order, build_run, finish_run
from rlhfkit.types import LossOutput, TokenizedExample

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """The teacher (frozen; run in the student's compute dtype)."""

    name: str = ""
    """Hub id or local directory of the teacher (it must share the student's tokenizer)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    attn_implementation: str = "varlen_sdpa"
    """The teacher's attention kernel."""

    def problems(self) -> Problems:
        """No teacher named."""
        return [] if self.name else [("name", "name the teacher (a hub id or a directory)")]


@dataclass
class DistillDataConfig:
    """Prompts (and, for ``off_policy dataset``, their completions)."""

    train: str = "builtin:arithmetic"
    """Prompt rows: a .jsonl/.json/.parquet/.csv file, a hub dataset or builtin:NAME."""
    train_split: str = "train"
    """Split of the training source."""
    eval: str | None = "builtin:arithmetic"
    """Held-out prompts for the KL and agreement metrics (None: none)."""
    eval_split: str = "heldout"
    """Split of the held-out source."""
    schema: str = "verifiable"
    """Row format (any schema with a prompt)."""
    limit: int | None = None
    """Use only the first N rows of each source."""
    eval_limit: int = 64
    """Held-out prompts used for the metrics."""
    max_prompt_len: int = 512
    """Prompts longer than this keep their last tokens."""

    def problems(self) -> Problems:
        """Missing or unreadable sources and invalid values (checked before loading)."""
        out = data_section_problems(self)
        if self.eval_limit < 1:
            out.append(("eval_limit", f"must be at least 1, got {self.eval_limit}"))
        return out


@dataclass
class DistillAlgoConfig:
    """The divergence and where the sequences come from."""

    lmbda: float = 0.5
    """Share of batches the student samples itself (GKD's lambda; 1: fully on-policy)."""
    beta: float = 0.5
    """0: forward KL(teacher || student); 1: reverse KL(student || teacher); in between GKD's
    generalised JSD."""
    temperature: float = 1.0
    """Divides both models' logits; the loss is scaled by its square."""
    top_k: int | None = None
    """Compare over the student's top-k ids plus a tail bucket (None: the whole vocabulary)."""
    off_policy: Literal["teacher", "dataset"] = "teacher"
    """Off-policy batches: the teacher's samples, or each row's 'completion' field."""
    compile: bool = True
    """Fuse the divergence's elementwise work over the vocabulary with torch.compile (about 3x
    faster on CPU; compiled once per machine, with a C++ compiler; eager if it fails)."""

    def problems(self) -> Problems:
        """Values outside their ranges."""
        out = []
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append((name, f"must be in [0, 1], got {getattr(self, name)}"))
        if self.temperature <= 0:
            out.append(("temperature", f"must be positive, got {self.temperature}"))
        if self.top_k is not None and self.top_k < 1:
            out.append(("top_k", f"must be at least 1 (or unset), got {self.top_k}"))
        return out


@dataclass
class DistillConfig:
    """rlhfkit distill: a student learns a teacher's token distributions (GKD)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    algo: DistillAlgoConfig = field(default_factory=DistillAlgoConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=128, temperature=1.0)
    )
    """How sequences are sampled (by the student on-policy, by the teacher off-policy)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=8, max_steps=100))
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/distill"))


def check_tokenizers(
    student: Any, teacher: Any, teacher_name: str, *, option: str = "--teacher.name"
) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (vocabulary or specials).

    Raises:
        ConfigError: Naming ``option`` and the first difference.
    """
    a, b = student.get_vocab(), teacher.get_vocab()
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        moved = [t for t in a if t in b and a[t] != b[t]][:3]
        detail = f"tokens in one only: {only}" if only else f"ids differ for {moved}"
        raise ConfigError(
            f"{option} {teacher_name}: its tokenizer differs from the student's "
            f"({len(b)} vs {len(a)} tokens; {detail}); distillation needs a shared tokenizer"
        )
    for name in ("eos_token", "bos_token", "pad_token"):
        if getattr(student, name, None) != getattr(teacher, name, None):
            raise ConfigError(
                f"{option} {teacher_name}: its {name} is {getattr(teacher, name, None)!r}, "
                f"the student's {getattr(student, name, None)!r}; distillation needs a shared "
                "tokenizer"
            )


def load_teacher(
    ctx: RunContext, name: str, *, trust_remote_code: bool = False,
    attn_implementation: str = "varlen_sdpa", option: str = "--teacher.name",
) -> torch.nn.Module:  # fmt: skip
    """A teacher, frozen, in the compute dtype, placed as the run places frozen models.

    Raises:
        ConfigError: Its output head has fewer rows than the shared tokenizer has tokens.
    """
    teacher = load_model(
        name, dtype=ctx.precision.compute, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if teacher.get_output_embeddings().weight.shape[0] < len(ctx.tokenizer):
        raise ConfigError(f"{option} {name}: its output head is smaller than the vocabulary")
    teacher.requires_grad_(False)
    return ctx.place.frozen(teacher)


def sampled_examples(
    generator: Any, prompts: list[PromptRow], sampling: SamplingConfig, source: str
) -> list[TokenizedExample]:
    """Each prompt with one sampled completion, labels on the completion's tokens.

    An empty completion (a stop string at once) stands as the end-of-turn token alone, so that
    every prompt keeps one example and every rank some work.
    """
    if not prompts:
        return []
    rollout = generator.generate([p.ids for p in prompts], replace(sampling, num_samples=1))
    out = []
    eos = list(getattr(generator, "eos_ids", None) or [])[:1]
    for p, ids in zip(prompts, rollout.completion_ids, strict=True):
        ids = list(ids) or eos
        mask = [False] * len(p.ids) + [True] * len(ids)
        out.append(
            TokenizedExample(list(p.ids) + ids, mask, source=f"{source} sample of {p.location}")
        )
    return out


def dataset_examples(tokenizer: Any, prompts: list[PromptRow]) -> list[TokenizedExample]:
    """Each prompt with its row's ``completion`` and end-of-turn token, labelled on those.

    Raises:
        ConfigError: A row has no ``completion`` string (naming the row).
    """
    out = []
    for p in prompts:
        completion = p.fields.get("completion")
        if not isinstance(completion, str):
            raise ConfigError(
                f"{p.location}: --algo.off-policy dataset needs a 'completion' string in every "
                "row (or use --algo.off-policy teacher)"
            )
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        out.append(
            TokenizedExample(
                list(p.ids) + ids, [False] * len(p.ids) + [True] * len(ids), source=p.location
            )
        )
    return out


def make_step_loss(
    student: torch.nn.Module, teacher: torch.nn.Module, loss: DistillLoss, vocab: int | None = None
):
    """The per-micro-batch loss: the summed per-token divergence over the global label count.

    ``vocab`` (the shared tokenizer's size) cuts both heads to the same rows: checkpoints of
    one family may pad their heads to different sizes past the vocabulary.
    """

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
        hidden, weight = label_hidden(student, batch)  # (N, H), (V, H)
        with torch.no_grad():
            t_hidden, t_weight = label_hidden(teacher, batch)  # (N, H'), (V', H')
        rows = vocab or min(weight.shape[0], t_weight.shape[0])
        total, per_token = distill_divergence_sum(
            hidden, weight[:rows], t_hidden, t_weight[:rows], loss
        )  # (), (N,)
        return LossOutput(
            loss=total / normaliser,
            metrics={"divergence_sum": total.detach(), "tokens": float(len(per_token))},
        )

    return step_loss


@torch.no_grad()
def heldout_metrics(
    ctx: RunContext, teacher: torch.nn.Module, examples: list[TokenizedExample], cfg: DistillConfig
) -> dict[str, float]:
    """Per-token forward and reverse KL and top-1 agreement on the held-out sequences.

    Token means over every label position of ``examples`` (summed over the ranks' shares).
    """
    if not examples:
        return {}
    totals = torch.zeros(4, dtype=torch.float64)  # forward, reverse, agreement, tokens
    forward, reverse = DistillLoss(beta=0.0), DistillLoss(beta=1.0)
    ctx.model.eval()
    mine = ctx.dist.shard(examples)
    with ctx.gathered(teacher):
        for batch in micro_batches(
            mine, packing=ctx.packing, budget=cfg.loop.micro_batch_tokens, pad_id=ctx.pad_id
        ):
            batch = ctx.to_device(batch)
            hidden, weight = label_hidden(ctx.model, batch)
            t_hidden, t_weight = label_hidden(teacher, batch)
            vocab = len(ctx.tokenizer)
            weight, t_weight = weight[:vocab], t_weight[:vocab]
            for start in range(0, hidden.shape[0], 256):
                rows = slice(start, start + 256)
                logits = (hidden[rows] @ weight.T).float()
                t_logits = (t_hidden[rows] @ t_weight.T).float()
                totals[0] += forward(logits, t_logits).sum().item()
                totals[1] += reverse(logits, t_logits).sum().item()
                totals[2] += (logits.argmax(-1) == t_logits.argmax(-1)).sum().item()
                totals[3] += logits.shape[0]
    ctx.model.train()
    f, r, agree, n = (all_reduce_sum(float(v)) for v in totals)
    return {"eval/forward_kl": f / n, "eval/reverse_kl": r / n, "eval/agreement": agree / n}


def step_examples(
    ctx: RunContext,
    cfg: DistillConfig,
    teacher: torch.nn.Module,
    prompts: list[PromptRow],
    student_turn: bool,
) -> list[TokenizedExample]:
    """Step 2: this rank's sequences: the student's samples, the teacher's, or the dataset's."""
    sampling = replace(cfg.sampling, seed=cfg.loop.seed * 1_000_003 + ctx.batches_done)
    if student_turn:
        return sampled_examples(
            chat_generator(ctx.model, ctx.tokenizer), prompts, sampling, "student"
        )
    if cfg.algo.off_policy == "teacher":
        return sampled_examples(
            chat_generator(teacher, ctx.tokenizer), prompts, sampling, "teacher"
        )
    return dataset_examples(ctx.tokenizer, prompts)


def on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether the batch of optimiser step ``step`` is sampled by the student.

    The same on every rank, and again when a run resumes.
    """
    return random.Random(seed * 1_000_003 + step).random() < lmbda


def main(cfg: DistillConfig) -> Path:
    """Run distillation; returns the run directory (the student under ``<run_dir>/final``)."""
    teacher_tokenizer = load_tokenizer(
        cfg.teacher.name, trust_remote_code=cfg.teacher.trust_remote_code
    )
    student_tokenizer = load_tokenizer(
        cfg.model.name, trust_remote_code=cfg.model.trust_remote_code
    )
    check_tokenizers(student_tokenizer, teacher_tokenizer, cfg.teacher.name)
    data = cfg.data  # the prompts, checked before any model loads
    prompts = load_prompt_rows(
        student_tokenizer, data.train, data.schema, split=data.train_split, limit=data.limit,
        max_prompt_len=data.max_prompt_len,
    )  # fmt: skip
    if len(prompts) < cfg.loop.batch_size:
        raise ConfigError(
            f"{data.train}: {len(prompts)} prompts < --loop.batch-size {cfg.loop.batch_size}"
        )
    if cfg.algo.lmbda < 1.0 and cfg.algo.off_policy == "dataset":
        dataset_examples(student_tokenizer, prompts)  # every row has its completion
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), resume=cfg.loop.resume,
        batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    ctx.packing = supports_padding_free(ctx.model)
    teacher = load_teacher(
        ctx, cfg.teacher.name, trust_remote_code=cfg.teacher.trust_remote_code,
        attn_implementation=cfg.teacher.attn_implementation,
    )  # fmt: skip
    held = []
    if data.eval:
        held_prompts = load_prompt_rows(
            ctx.tokenizer, data.eval, data.schema, split=data.eval_split, limit=data.eval_limit,
            max_prompt_len=data.max_prompt_len,
        )  # fmt: skip
        greedy = replace(cfg.sampling, temperature=0.0, seed=0)
        with ctx.gathered(teacher):  # the same fixed sequences on every rank
            held = sampled_examples(
                chat_generator(teacher, ctx.tokenizer), held_prompts, greedy, "teacher"
            )
    per_epoch = len(prompts) // cfg.loop.batch_size
    total = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * per_epoch))
    ctx.start_training(cfg.optim, total)
    if ctx.step == 0 and held:
        ctx.logger.log(0, heldout_metrics(ctx, teacher, held, cfg))
    loss = DistillLoss(
        beta=cfg.algo.beta, temperature=cfg.algo.temperature, top_k=cfg.algo.top_k,
        compile=cfg.algo.compile,
    )  # fmt: skip
    step_loss = make_step_loss(ctx.model, teacher, loss, vocab=len(ctx.tokenizer))
    with ctx.progress(total) as bar:
        while ctx.step < total:
            order = batch_order(len(prompts), cfg.loop.batch_size, cfg.loop.seed, ctx.batches_done)
            mine = ctx.dist.shard([prompts[i] for i in order])
            student_turn = on_policy(cfg.loop.seed, ctx.batches_done, cfg.algo.lmbda)
            with ctx.gathered(teacher):  # sampling runs a different number of passes per rank
                examples = step_examples(ctx, cfg, teacher, mine, student_turn)
            parts = [
                ctx.to_device(b) for b in micro_batches(
                    examples, packing=ctx.packing, budget=cfg.loop.micro_batch_tokens,
                    pad_id=ctx.pad_id,
                )
            ]  # fmt: skip
            with gathered(teacher):  # whole while it is used (sharded at rest under FSDP2)
                stats = accumulate(
                    parts, step_loss, count_fn=label_count, after_backward=ctx.master.collect_grads,
                    models=ctx.models,
                )  # fmt: skip
            if not ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
                continue
            value = all_reduce_sum(stats.loss)
            tokens = int(all_reduce_sum(sum(len(e.input_ids) for e in examples)))
            bar.update(loss=value, tokens=tokens)
            metrics = {
                "train/loss": value, "train/on_policy": float(student_turn),
                "train/label_tokens": stats.normaliser,
                "train/completion_length": all_reduce_sum(sum(e.num_loss_tokens for e in examples))
                / max(1.0, all_reduce_sum(len(examples))),
            }  # fmt: skip
            if cfg.loop.eval_every and ctx.step % cfg.loop.eval_every == 0 and ctx.step < total:
                metrics.update(heldout_metrics(ctx, teacher, held, cfg))
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                ctx.save(cfg.loop.keep_last)
    if held:
        ctx.logger.log(ctx.step, heldout_metrics(ctx, teacher, held, cfg))
    return finish_run(ctx, cfg.loop.keep_last)
