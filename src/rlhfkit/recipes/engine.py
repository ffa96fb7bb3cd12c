"""The policy's rollout engine in a training recipe: a vLLM server kept in sync with the learner.

``rl`` and ``dpo online`` sample the policy they train. With ``--engine.backend vllm`` a server
starts on the run's starting model (or is attached to by URL), and the learner's weights are
pushed into it whenever they changed since the engine last sampled; a resumed run, a LoRA run
and an attached server get the current weights first. Under LoRA the server gets the adapter
itself (``--engine.vllm-lora adapter``, the default: it serves the base model plus the adapter)
or the merged weights (``merged``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rlhfkit.config import EngineConfig
from rlhfkit.rollout.vllm import VLLMAdapterEngine, VLLMEngine
from rlhfkit.rollout.vllm_server import vllm_server
from rlhfkit.training.context import RunContext


@contextlib.contextmanager
def vllm_policy(ctx: RunContext, engine: EngineConfig, seed: int) -> Iterator[VLLMEngine]:
    """A vLLM server as the rollout engine of ``ctx``'s policy, stopped on exit.

    The server's log is ``<run_dir>/vllm-server.log``; its weights are those of step
    ``engine.version`` (:meth:`VLLMEngine.push` and :meth:`VLLMEngine.apply` move them).
    """
    dtype = ctx.precision.compute
    adapter = ctx.lora_base is not None and engine.vllm_lora == "adapter"
    rank = ctx.lora_base[1].r if adapter and ctx.lora_base is not None else None
    with vllm_server(
        engine, ctx.source[0], dtype, seed=seed, log_dir=ctx.run_dir, lora_rank=rank
    ) as server:
        kind = VLLMAdapterEngine if adapter else VLLMEngine
        policy = kind(
            server, ctx.model, eos_ids=[ctx.tokenizer.eos_token_id], dtype=dtype, version=0
        )
        if ctx.step > 0 or ctx.lora_base is not None or engine.vllm_url:
            policy.push(ctx.model, ctx.step)  # the server may hold other weights than these
        try:
            yield policy
        finally:
            policy.close()


def synced(policy: VLLMEngine, ctx: RunContext) -> VLLMEngine:
    """``policy`` holding the learner's current weights (pushed and loaded if they moved)."""
    if policy.latest != ctx.step:
        policy.push(ctx.model, ctx.step)
    policy.apply()
    return policy
