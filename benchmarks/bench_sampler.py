"""Sampler benchmark: rlhfkit's HFGenerator vs transformers ``model.generate`` on the same batch.

Both sides sample from the embedded SmolLM2-135M-Instruct with bf16 weights: the same 8
arithmetic prompts (``builtin:arithmetic``, train split, rendered with rlhfkit's chat template),
8 samples per prompt (64 sequences), temperature 1.0 with no top-k, top-p or min-p filtering,
and exactly 64 new tokens per sequence: the end-of-sequence id ends nothing on either side
(``eos_ids=[]`` / ``eos_token_id=[]``), so every batch generates 4,096 tokens and the two sides do
the same number of decode steps. Both run in one process (2 torch threads), one batch at a time,
alternating rlhfkit, transformers, rlhfkit, ... after warm-up batches, with a bf16 matmul-rate
sample before every round.

- rlhfkit: ``HFGenerator.generate`` on the model as the RL recipe loads it (``load_model``, its
  default ``varlen_sdpa`` attention) with ``SamplingConfig(num_samples=8)``: each prompt is
  prefilled once (8 rows) and its KV cache repeated 8 times (shared prefill, a legitimate
  advantage of the sampler), then one fp32 ``logsumexp`` per step serves the inverse-CDF draw
  and the sampled token's log-prob, which the sampler returns.
- transformers: ``model.generate`` on ``AutoModelForCausalLM.from_pretrained`` (default ``sdpa``)
  with ``GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
  num_return_sequences=8, max_new_tokens=64, min_new_tokens=0, eos_token_id=[])``: the 8 prompts
  are expanded to 64 rows before the prefill; no log-probs are returned.

Figures: tokens/s per side (generated tokens / wall seconds of the call, median over rounds),
their ratio, and MFU-style figures against the measured matmul peak: 2 * params * generated
tokens / seconds / peak, and the same with the prefill positions each side computed; the
process's peak RSS (both models loaded); and the ceiling of any sampler here: the time of one
decode step's matmuls alone (every linear layer on the 64-row batch), as tokens/s and as a
multiple of transformers', and rlhfkit's share of it; and the same ceiling with the weights
prepacked as rlhfkit's decode step prepacks them (``packed_ceiling``: the products themselves
run faster, so it is the higher bound). See benchmarks/README.md.

    python benchmarks/bench_sampler.py [--steps 4] [--warmup 1] [--profile]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import common

SIDES = ("rlhfkit", "transformers")
"""The two sides, in the order they run within a round."""


@dataclass(frozen=True)
class Settings:
    """What both sides are asked to do."""

    steps: int = 4
    """Measured rounds (one batch per side each)."""
    warmup: int = 1
    """Warm-up rounds (not measured)."""
    prompts: int = 8
    """Distinct prompts per batch."""
    samples: int = 8
    """Samples per prompt."""
    new_tokens: int = 64
    """New tokens per sequence (EOS disabled, so exactly this many)."""
    temperature: float = 1.0
    """Sampling temperature (no top-k / top-p / min-p)."""
    threads: int = 2
    """torch threads."""
    seed: int = 0
    """Seed of the sampling (round k uses seed + k on both sides)."""
    data: str = "builtin:arithmetic"
    """Prompt source (train split, the first ``prompts`` rows)."""


def parse(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """Command line -> (settings, profile one extra batch per side?)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up rounds")
    parser.add_argument("--prompts", type=int, default=defaults.prompts)
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--data", default=defaults.data, help="prompt source (train split)")
    parser.add_argument(
        "--profile", action="store_true", help="one extra batch per side under torch.profiler"
    )
    args = vars(parser.parse_args(argv))
    profile = args.pop("profile")
    return Settings(**args), profile


# ---------------------------------------------------------------------------------------------
# The two sides


def load_prompts(tokenizer: Any, settings: Settings) -> list[list[int]]:
    """Rendered prompt ids of the first ``prompts`` rows (rlhfkit's chat rendering)."""
    from rlhfkit.data.schemas import load_examples
    from rlhfkit.data.templates import render_prompt

    examples = load_examples(settings.data, "verifiable", split="train", limit=settings.prompts)
    return [render_prompt(tokenizer, list(e.prompt)) for e in examples.examples]


class RlhfkitSide:
    """``HFGenerator`` on the model as the RL recipe loads it, EOS disabled."""

    def __init__(self, tokenizer: Any, prompts: list[list[int]], settings: Settings) -> None:
        import torch

        from rlhfkit.models.load import load_model
        from rlhfkit.rollout.hf import SamplingConfig
        from rlhfkit.rollout.sampler import HFGenerator

        self.model = load_model("smollm2-135m-instruct", dtype=torch.bfloat16).eval()
        self.generator = HFGenerator(self.model, pad_id=tokenizer.pad_token_id, eos_ids=[])
        self.prompts, self.settings = prompts, settings
        self.sampling = SamplingConfig(
            max_new_tokens=settings.new_tokens, temperature=settings.temperature,
            top_p=1.0, top_k=0, min_p=0.0, num_samples=settings.samples,
        )  # fmt: skip
        self.prefill_positions = len(prompts) * max(map(len, prompts))

    def run(self, seed: int) -> dict[str, Any]:
        """One batch; its times and the generated token count."""
        from dataclasses import replace

        sampling = replace(self.sampling, seed=seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        rollout = self.generator.generate(self.prompts, sampling)
        seconds = time.perf_counter() - start
        lengths = [len(c) for c in rollout.completion_ids]
        return {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_start,
            "sequences": len(lengths),
            "tokens": sum(lengths),
            "min_new_tokens": min(lengths),
            "prefill_positions": self.prefill_positions,
            "mean_logprob": sum(map(sum, rollout.logprobs)) / max(sum(lengths), 1),
        }


class TransformersSide:
    """``model.generate`` on a plain ``from_pretrained`` bf16 model, EOS disabled."""

    def __init__(self, tokenizer: Any, prompts: list[list[int]], settings: Settings) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        from rlhfkit.models.embedded import embedded_model_dir

        path = str(embedded_model_dir())
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding, the same ids as rlhfkit's
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        self.inputs = {"input_ids": ids, "attention_mask": mask}
        self.config = GenerationConfig(
            do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0,
            max_new_tokens=settings.new_tokens, min_new_tokens=0,
            num_return_sequences=settings.samples, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[],  # no stopping: every row generates max_new_tokens
        )  # fmt: skip
        self.prefill_positions = len(prompts) * settings.samples * width

    def run(self, seed: int) -> dict[str, Any]:
        """One batch; its times and the generated token count."""
        import torch

        torch.manual_seed(seed)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = self.model.generate(**self.inputs, generation_config=self.config)
        seconds = time.perf_counter() - start
        new = out.shape[1] - self.inputs["input_ids"].shape[1]
        return {
            "seconds": seconds,
            "cpu_seconds": time.process_time() - cpu_start,
            "sequences": out.shape[0],
            "tokens": out.shape[0] * new,  # no row stops early (no EOS), so all are generated
            "min_new_tokens": new,
            "prefill_positions": self.prefill_positions,
        }


def matmul_floor(model: Any, rows: int, repeats: int = 5, packed: bool = False) -> float:
    """Seconds of one decode step's matmuls alone: every ``nn.Linear`` of ``model`` (the
    projections, the MLPs and the vocabulary head) applied once to a (rows, 1, in) bf16 input.

    Any sampler on this model, batch and CPU needs at least this per decode step (attention,
    norms, rotary, the cache and sampling come on top), so ``rows / floor`` tokens/s bounds
    what any of them can reach with these products. The median of ``repeats`` timed passes
    after one warm-up. ``packed``: the same products on weights prepacked for oneDNN
    (``rlhfkit.models.decode.Linear``, each layer separately, on (rows, in) inputs), which
    rlhfkit's decode step uses: the bound for a sampler that prepacks its weights.
    """
    import torch

    from rlhfkit.models.decode import Linear

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shape = (rows,) if packed else (rows, 1)
    inputs = {
        width: torch.randn(*shape, width, dtype=torch.bfloat16)
        for width in {m.in_features for m in linears}
    }
    if packed:
        linears = [
            _Prepacked(Linear(m.weight.detach(), m.bias, rows), m.in_features) for m in linears
        ]
    times = []
    with torch.no_grad():
        for k in range(repeats + 1):
            start = time.perf_counter()
            for linear in linears:
                linear(inputs[linear.in_features])
            if k:
                times.append(time.perf_counter() - start)
    return common.median(times)


@dataclass
class _Prepacked:
    """A prepacked linear layer with the ``in_features`` :func:`matmul_floor` reads."""

    linear: Any
    in_features: int

    def __call__(self, x: Any) -> Any:
        return self.linear(x)


# ---------------------------------------------------------------------------------------------
# Driver


def figures(
    report: common.Reporter,
    answers: dict[str, list[dict]],
    samples: list[dict],
    params: int,
    ceiling: float,
) -> None:
    """The per-side rates and MFU, their ratios, and the matmul ceiling against transformers."""
    peak = common.median([x for s in samples for x in s["samples"]])
    report.figure("peak_bf16_tflops", peak / 1e12)
    rates = {}
    for name in SIDES:
        steps = answers[name]
        rates[name] = [s["tokens"] / s["seconds"] for s in steps]
        flops = [common.forward_flops(params, s["tokens"]) / s["seconds"] for s in steps]
        with_prefill = [
            common.forward_flops(params, s["tokens"] + s["prefill_positions"]) / s["seconds"]
            for s in steps
        ]
        report.figure(f"{name}.s_per_batch", common.median([s["seconds"] for s in steps]))
        report.figure(f"{name}.tokens_per_s", common.median(rates[name]))
        report.figure(f"{name}.mfu", common.median(flops) / peak)
        report.figure(f"{name}.mfu_with_prefill", common.median(with_prefill) / peak)
        report.figure(f"{name}.cpu_s_per_batch", common.median([s["cpu_seconds"] for s in steps]))
    report.figure(
        "speedup_tokens_per_s", common.ratio_of_medians(rates["rlhfkit"], rates["transformers"])
    )
    rounds = [a / b for a, b in zip(rates["rlhfkit"], rates["transformers"], strict=True)]
    report.figure("speedup_median_round_ratio", common.median(rounds))
    report.figure("ceiling_tokens_per_s", ceiling)
    report.figure("ceiling_over_transformers", ceiling / common.median(rates["transformers"]))
    report.figure("rlhfkit.share_of_ceiling", common.median(rates["rlhfkit"]) / ceiling)


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Alternate the two sides over warm-up and measured rounds, then report."""
    common.set_threads(settings.threads)
    import torch
    import transformers

    from rlhfkit.models.load import load_tokenizer

    transformers.logging.set_verbosity_error()
    report = common.Reporter("sampler")
    report.details["environment"] = common.environment(("torch", "transformers", "rlhfkit"))
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    prompts = load_prompts(tokenizer, settings)
    sides = {
        "rlhfkit": RlhfkitSide(tokenizer, prompts, settings),
        "transformers": TransformersSide(tokenizer, prompts, settings),
    }
    params = sum(p.numel() for p in sides["rlhfkit"].model.parameters())
    same_weights = all(
        torch.equal(a, b)
        for a, b in zip(
            sides["rlhfkit"].model.state_dict().values(),
            sides["transformers"].model.state_dict().values(),
            strict=True,
        )
    )
    samples = [common.peak_sample()]
    answers: dict[str, list[dict]] = {name: [] for name in SIDES}
    warm: dict[str, list[dict]] = {name: [] for name in SIDES}
    for k in range(settings.warmup + settings.steps):
        measured = k >= settings.warmup
        if measured:
            samples.append(common.peak_sample())
        for name in SIDES:
            answer = sides[name].run(settings.seed + k)
            answer["load_average"] = os.getloadavg()
            (answers if measured else warm)[name].append(answer)
            print(f"round {k} {name}: {answer['seconds']:.2f} s", flush=True)
    samples.append(common.peak_sample())
    rows = settings.prompts * settings.samples
    floor = matmul_floor(sides["rlhfkit"].model, rows)
    peak_rss = common.peak_rss_mib()  # both models, before the profiler's own memory
    profiles = {}
    if profile:
        for name in SIDES:
            profiles[name] = common.profiled(lambda s=sides[name]: s.run(settings.seed))["profile"]

    packed_floor = matmul_floor(sides["rlhfkit"].model, rows, packed=True)
    figures(report, answers, samples, params, rows / floor)
    report.figure("matmul_floor_ms_per_step", floor * 1e3)
    report.figure("packed_matmul_floor_ms_per_step", packed_floor * 1e3)
    report.figure("packed_ceiling_tokens_per_s", rows / packed_floor)
    rate = common.median([s["tokens"] / s["seconds"] for s in answers["rlhfkit"]])
    report.figure("rlhfkit.share_of_packed_ceiling", rate * packed_floor / rows)
    report.figure("peak_rss_mib", peak_rss)
    tokens = {name: [s["tokens"] for s in warm[name] + answers[name]] for name in SIDES}
    report.details.update(
        settings=asdict(settings),
        work={
            "same_weights": same_weights,
            "params": params,
            "prompt_lengths": [len(p) for p in prompts],
            "tokens_per_batch": tokens,
            "same_token_counts": tokens["rlhfkit"] == tokens["transformers"],
            "every_row_full_length": all(
                s["min_new_tokens"] == settings.new_tokens
                for name in SIDES
                for s in warm[name] + answers[name]
            ),
            "attn_implementation": {
                name: sides[name].model.config._attn_implementation for name in SIDES
            },
        },
        warmup_steps=warm,
        measured_steps=answers,
        matmul_peak_samples=samples,
        profile=profiles or None,
    )
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    settings, profile = parse(argv)
    report = run(settings, profile)
    for name, table in (report.details.get("profile") or {}).items():
        print(f"--- {name}\n{table}")
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
