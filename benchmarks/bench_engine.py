"""Rollout engines: vLLM vs rlhfkit's sampler vs transformers `generate`, and GRPO on each.

Part 1, sampling: the embedded SmolLM2-135M-Instruct samples 64 sequences of exactly 64 new
tokens (16 prompts x 4 samples, T = 1, end-of-turn ignored so every side does the same work) at
the machine's compute precision, ``--rounds`` times per side after one warm-up call each:
rlhfkit's sampler and ``generate`` alternating, then the vLLM server alone (an idle vLLM
worker still spins on a core). Tokens/s is 64 * 64 over the wall time of one call. The server
runs in its own environment (``make vllm``); its start-up time is reported apart.

Part 2, GRPO: ``rlhfkit rl`` on the arithmetic prompts with the HF backend, the vLLM backend
(synchronous) and the vLLM backend with ``--engine.max-staleness 1`` (asynchronous), the same
settings otherwise; the median step time (from the metrics' timestamps, first step excluded)
and the weight-sync time per step. Then TRL's ``GRPOTrainer`` (``generate``, no vLLM: the CPU
engine's environment has no TRL) on the same prompts and settings (4 prompts x 8 samples x up
to 48 tokens, T = 1, k3 KL 0.04 in the loss, lr 1e-6), driven by ``bench_grpo.py``'s worker;
its median time per step (first step excluded).

    python benchmarks/bench_engine.py [--rounds 3] [--grpo-steps 6] [--skip-grpo] [--skip-trl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from rlhfkit.data.templates import render_prompt
from rlhfkit.models.load import load_model, load_tokenizer, resolve_model_path
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import HFGenerator
from rlhfkit.rollout.vllm import VLLMGenerator
from rlhfkit.rollout.vllm_server import ServerSettings, VLLMServer

MODEL = "smollm2-135m-instruct"
QUESTIONS = [f"What is {a} + {a + 30}? Explain briefly." for a in range(10, 26)]


def sampling_part(rounds: int) -> dict:
    """Tokens/s of the three samplers on the same 64 x 64 work."""
    tokenizer = load_tokenizer(MODEL)
    dtype = resolve_precision("auto", default_device()).compute
    model = load_model(MODEL, dtype=dtype).eval()
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    sampling = SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=4, seed=0)
    ours = HFGenerator(model, pad_id=tokenizer.pad_token_id, eos_ids=[])  # never stops early

    def rlhfkit_call() -> int:
        return sum(len(c) for c in ours.generate(prompts, sampling).completion_ids)

    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate_call() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                max_new_tokens=64, min_new_tokens=64, num_return_sequences=4,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        return int((out.shape[1] - width) * out.shape[0])

    def measure(sides: dict) -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for call in sides.values():
            call()  # warm-up
        for _ in range(rounds):
            for side, call in sides.items():
                t = time.perf_counter()
                tokens = call()
                rates[side].append(tokens / (time.perf_counter() - t))
        return rates

    # The in-process samplers first, alternating, then the engine alone: on a small machine an
    # idle vLLM worker still spins on a core, which would slow the other sides.
    rates = measure({"rlhfkit": rlhfkit_call, "generate": generate_call})
    start = time.perf_counter()
    name = {torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    logs = Path(__file__).parent / "results"
    logs.mkdir(exist_ok=True)
    server = VLLMServer(ServerSettings(model=resolve_model_path(MODEL), dtype=name), log_dir=logs)
    startup = time.perf_counter() - start
    engine = VLLMGenerator(server, eos_ids=[])

    def vllm_call() -> int:
        body = engine._body(prompts, sampling)
        body.update(ignore_eos=True, stop_token_ids=[])
        answer = server.post("/v1/completions", body)
        return sum(len(c["logprobs"]["tokens"]) for c in answer["choices"])

    try:
        rates.update(measure({"vllm": vllm_call}))
    finally:
        server.close()
    return {"tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "all": rates, "vllm_startup_s": startup, "dtype": name}  # fmt: skip


def grpo_part(steps: int) -> dict:
    """Median GRPO step time on each backend (same prompts, rewards and settings)."""
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import policy_gradient as pg

    out = {}
    variants = {
        "hf": {},
        "vllm (sync)": {"backend": "vllm"},
        "vllm (async, max_staleness 1)": {"backend": "vllm", "max_staleness": 1},
    }
    for name, engine in variants.items():
        with tempfile.TemporaryDirectory() as run:
            cfg = from_dict(pg.PGConfig, {
                "model": {"name": MODEL},
                "data": {"train": "builtin:arithmetic", "limit": 64},
                "engine": engine,
                "sampling": {"num_samples": 8, "max_new_tokens": 48, "temperature": 1.0},
                "optim": {"lr": 1e-6, "warmup_ratio": 0.0, "schedule": "constant"},
                "loop": {"batch_size": 4, "max_steps": steps, "save_every": 0},
                "log": {"run_dir": run, "progress": False, "tensorboard": False},
                "sample_every": 0,
            })  # fmt: skip
            start = time.perf_counter()
            pg.main(cfg)
            wall = time.perf_counter() - start
            rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
            times = [r["time"] for r in rows if "train/loss" in r]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            out[name] = {
                "median_step_s": statistics.median(gaps) if gaps else float("nan"),
                "wall_s": wall,
                "reward": statistics.fmean(r["rollout/reward"] for r in rows if "train/loss" in r),
                "staleness": [r.get("async/staleness") for r in rows if "train/loss" in r],
                "sync_s": statistics.fmean(r.get("async/sync_s", 0.0) for r in rows),
            }  # fmt: skip
    return out


def trl_part(steps: int) -> dict:
    """TRL's GRPOTrainer on the arithmetic prompts of ``grpo_part``, in its own process."""
    import bench_grpo
    from rlhfkit.data.prompts import load_prompt_rows

    settings = bench_grpo.Settings(
        batch_size=4, num_samples=8, max_new_tokens=48, lr=1e-6, beta=0.04, steps=steps,
        warmup=1,
    )  # fmt: skip
    tokenizer = load_tokenizer(MODEL)
    rows = []
    for r in load_prompt_rows(tokenizer, "builtin:arithmetic", "verifiable", limit=64):
        prompt = r.fields["prompt"]  # a chat, as rlhfkit renders it
        chat = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        rows.append({"prompt": chat, "answer": r.fields["answer"]})
    worker = common.Worker.start("trl", bench_grpo.trl_worker, settings, rows)
    try:
        worker.wait_ready()
        answers = [worker.request("step") for _ in range(settings.total_steps)]
        worker.request("stop")
    finally:
        worker.close()
    seconds = [a["seconds"] for a in answers[settings.warmup :]]
    return {
        "median_step_s": statistics.median(seconds),
        "reward": statistics.fmean(a["reward"] for a in answers),
        "mean_completion_length": statistics.fmean(
            x for a in answers for x in a["completion_lengths"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--grpo-steps", type=int, default=6)
    parser.add_argument("--skip-grpo", action="store_true")
    parser.add_argument("--skip-trl", action="store_true")
    ns = parser.parse_args()
    common.set_threads(2)
    print(f"machine: {common.cpu_model()}")
    sampling = sampling_part(ns.rounds)
    rates = sampling["tokens_per_s"]
    print(f"\nsampling 64 x 64 tokens ({sampling['dtype']}), median of {ns.rounds} rounds:")
    for side, rate in rates.items():
        print(f"  {side:9s} {rate:7.0f} tokens/s  ({rate / rates['generate']:.2f}x generate)")
    print(f"  vLLM server start-up: {sampling['vllm_startup_s']:.0f} s")
    result = {"sampling": sampling}
    if not ns.skip_grpo:
        grpo = grpo_part(ns.grpo_steps)
        result["grpo"] = grpo
        print(f"\nGRPO, {ns.grpo_steps} steps of 4 prompts x 8 samples x up to 48 tokens:")
        base = grpo["hf"]["median_step_s"]
        for name, r in grpo.items():
            step = r["median_step_s"]
            print(f"  {name:31s} {step:6.2f} s/step ({base / step:.2f}x hf steps/s), "
                  f"wall {r['wall_s']:.0f} s, sync {r['sync_s']:.2f} s, "
                  f"staleness {r['staleness']}")  # fmt: skip
        if not ns.skip_trl:
            trl = trl_part(ns.grpo_steps)
            grpo["trl GRPOTrainer"] = trl
            step = trl["median_step_s"]
            print(f"  {'trl GRPOTrainer (generate)':31s} {step:6.2f} s/step "
                  f"({base / step:.2f}x hf steps/s)")  # fmt: skip
            for name, r in grpo.items():
                if name != "trl GRPOTrainer":
                    print(f"  {name}: {step / r['median_step_s']:.2f}x TRL's steps/s")
    out = Path(__file__).parent / "results" / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
