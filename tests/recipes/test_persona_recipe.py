"""rlhfkit persona extract | monitor | steer on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from rlhfkit.cli import main as cli_main
from rlhfkit.config import ModelConfig
from rlhfkit.data.traits import load_trait
from rlhfkit.eval.run import load_sampler
from rlhfkit.recipes import persona, persona_steer
from rlhfkit.rollout.hf import SamplingConfig

QUESTIONS = ["What is rain?", "Name a fruit.", "How do boats float?", "Why sleep?",
             "What is a map?", "Name a colour."]  # fmt: skip
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=1)


def _trait(tmp_path: Path, positive: str, negative: str) -> Path:
    path = tmp_path / "trait.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cheer", "positive": positive, "negative": negative, "questions": QUESTIONS,
        "heldout": 2, "markers": ["!", "yay"],
    }))  # fmt: skip
    return path


def _extract(model_dir, tmp_path, trait, name="vec") -> Path:
    out = tmp_path / name
    persona.extract(persona.PersonaExtractConfig(
        model=ModelConfig(name=str(model_dir), precision="fp32"), trait=str(trait),
        sampling=GREEDY, filter="none", batch_size=3, output=str(out),
    ))  # fmt: skip
    return out


def test_the_vector_is_exactly_zero_when_the_two_prompts_are_the_same(tiny_model_dir, tmp_path):
    out = _extract(tiny_model_dir, tmp_path, _trait(tmp_path, "Be brief.", "Be brief."))
    for name, tensor in load_file(out / "vectors.safetensors").items():
        assert not tensor.any(), name
    meta = json.loads((out / "persona.json").read_text())
    assert meta["heldout_auroc"] == [0.5] * meta["layers"]


def test_extract_monitor_and_steer(tiny_model_dir, tmp_path):
    trait = _trait(tmp_path, "Shout with joy! Yay!", "Speak flatly.")
    out = _extract(tiny_model_dir, tmp_path, trait)
    meta = json.loads((out / "persona.json").read_text())
    vectors = load_file(out / "vectors.safetensors")
    assert set(vectors) == {"response", "prompt_avg", "last_prompt"}
    assert vectors["response"].shape == (meta["layers"], meta["hidden_size"])
    assert meta["kept"] == {"positive": 4, "negative": 4, "answers": 8}
    assert 0 <= meta["layer"] < meta["layers"] and len(meta["heldout_auroc"]) == meta["layers"]
    assert meta["train_separation"][meta["layer"]] == max(meta["train_separation"])
    assert meta["heldout_auroc_unfiltered"] == meta["heldout_auroc"]  # filter none: the same
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {(s["split"], s["side"]) for s in samples} == {
        (split, side) for split in ("train", "heldout") for side in ("positive", "negative")
    }
    # monitor: one projection per row, prompts alone with last_prompt
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yay!"}]},
        {"prompt": "Hello", "completion": "Fine."},
    ]) + "\n")  # fmt: skip
    model = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    scores = persona_steer.monitor(persona_steer.PersonaMonitorConfig(
        model=model, vector=str(out), data=str(rows), output=str(tmp_path / "m.jsonl"),
    ))  # fmt: skip
    written = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [w["projection"] for w in written] == scores and len(scores) == 2
    # steer: alpha 0 answers as the unsteered model does; the report has every alpha
    report = persona_steer.steer(persona_steer.PersonaSteerConfig(
        model=model, vector=str(out), alphas=(0.0, 8.0), cap_quantile=0.5, sampling=GREEDY,
        output=str(tmp_path / "steer"),
    ))  # fmt: skip
    assert [r["alpha"] for r in report["results"]] == [0.0, 8.0]
    assert report["cap_tau"] is not None and report["layer"] == meta["layer"]
    assert all(r["perplexity"] > 0 for r in report["results"])
    assert report["unsteered"]["perplexity"] > 0  # capped alpha 0 is not the reference
    plain = persona_steer.steer(persona_steer.PersonaSteerConfig(
        model=model, vector=str(out), alphas=(0.0,), sampling=GREEDY,
        output=str(tmp_path / "plain"),
    ))  # fmt: skip
    assert plain["results"][0]["coherent"] and plain["coherent_alphas"] == [0.0]
    assert plain["unsteered"] == {k: plain["results"][0][k]
                                  for k in ("trait_score", "perplexity", "distinct_2")}  # fmt: skip
    texts = [
        json.loads(x)["text"] for x in (tmp_path / "plain/samples.jsonl").read_text().splitlines()
    ]
    _, tokenizer, generator = load_sampler(model)
    cheer = load_trait(str(trait))
    unsteered = persona.answer(generator, tokenizer, cheer, cheer.heldout_questions, None, GREEDY)
    assert texts == [a.text for a in unsteered]  # alpha 0: exactly the unsteered answers


def test_the_coherence_bound_by_hand():
    ref = {"perplexity": 2.0, "distinct_2": 0.9}
    assert persona_steer.coherent({"perplexity": 4.0, "distinct_2": 0.81}, ref, 2.0, 0.9)
    assert not persona_steer.coherent({"perplexity": 4.01, "distinct_2": 0.9}, ref, 2.0, 0.9)
    assert not persona_steer.coherent({"perplexity": 2.0, "distinct_2": 0.8}, ref, 2.0, 0.9)


def test_the_filtered_heldout_auroc_uses_only_the_answers_the_filter_keeps():
    import torch

    def ans(side: str, score: float) -> persona.Answer:
        return persona.Answer("q", side, [1], [2], "", score)

    # one layer, D = 1, vector (1,): the projection is the activation itself
    answers = [ans("positive", 2.0), ans("positive", 0.0), ans("negative", 0.0),
               ans("negative", 1.0)]  # fmt: skip
    acts = torch.tensor([3.0, -1.0, 0.0, 5.0]).view(4, 1, 1)
    vectors = torch.ones(1, 1)

    def aurocs(filter_: str) -> list[float]:
        kept = [persona._kept(answers, side, filter_) for side in ("positive", "negative")]
        return persona.heldout_aurocs(acts, vectors, *kept)

    # kept: the eliciting answer with the trait (3.0) against the suppressing one without (0.0)
    assert aurocs("markers") == [1.0]
    # all answers by system prompt: {3, -1} against {0, 5}: 1 of 4 pairs ordered right
    assert aurocs("none") == [0.25]
    assert math.isnan(persona.heldout_aurocs(acts, vectors, [0], [])[0])  # an empty side


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["persona", "extract", "--trait", "nosuch.yaml"], "no such file"),
        (["persona", "steer", "--vector", "/nonexistent"], "not a persona vector directory"),
        (["persona", "monitor", "--vector", "/nonexistent"], "not a persona vector directory"),
        (["persona", "steer", "--vector", "/nonexistent", "--cap-quantile", "2"], "--cap-quantile"),
    ],
)
def test_user_errors_are_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_malformed_trait_file_names_its_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "positive": "p", "negative": "n",
                                   "questions": ["a", "b", "c"], "markers": "!"}))  # fmt: skip
    with pytest.raises(SystemExit):
        cli_main(["persona", "extract", "--trait", str(bad)])
    err = capsys.readouterr().err
    assert "markers" in err and "Traceback" not in err


def test_model_steer_steers_samplers_and_trains_preventatively(tiny_model_dir, tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file as load_weights

    from rlhfkit.config import LogConfig, LoopConfig, OptimConfig
    from rlhfkit.recipes import sft

    out = _extract(tiny_model_dir, tmp_path, _trait(tmp_path, "Shout! Yay!", "Be flat."))
    base = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    cheer = load_trait(str(tmp_path / "trait.yaml"))

    def texts(model_cfg: ModelConfig) -> list[str]:
        _, tokenizer, generator = load_sampler(model_cfg)
        answers = persona.answer(generator, tokenizer, cheer, cheer.questions, None, GREEDY)
        return [a.text for a in answers]

    plain = texts(base)
    assert texts(replace(base, steer=str(out), steer_alpha=0.0)) == plain
    assert texts(replace(base, steer=str(out), steer_alpha=1e4)) != plain
    # preventative steering: the run trains with the hook, the saved model carries none
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": f"Yay! {q}"},
    ]}) + "\n" for q in QUESTIONS))  # fmt: skip
    finals = {}
    for name, model_cfg in (("plain", base), ("steered", replace(base, steer=str(out),
                                                                  steer_alpha=50.0))):  # fmt: skip
        run = tmp_path / name
        sft.main(sft.SFTConfig(
            model=model_cfg, data=sft.SFTDataConfig(train=str(data), eval=None),
            optim=OptimConfig(lr=1e-2, warmup_ratio=0.0),
            loop=LoopConfig(max_steps=1, batch_size=4, micro_batch_tokens=512),
            log=LogConfig(run_dir=str(run), tensorboard=False, progress=False),
        ))  # fmt: skip
        finals[name] = load_weights(run / "final" / "model.safetensors")
    assert any(not (finals["plain"][k] == finals["steered"][k]).all() for k in finals["plain"])


def test_a_missing_steer_vector_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["generate", "--model.steer", "/nonexistent/vec", "--prompts", "hi"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--model.steer" in err and "persona.json" in err and "Traceback" not in err


def _character(tmp_path: Path) -> tuple[Path, Path]:
    """A trait file and a constitution file for the character-training commands."""
    text = tmp_path / "character.md"
    text.write_text("I am a cheerful robot who says yay a lot.")
    return _trait(tmp_path, "Shout! Yay!", "Be flat."), text


def _replies(model: ModelConfig, questions: list[str], system: str | None,
             sampling: SamplingConfig) -> dict[str, list[str]]:  # fmt: skip
    """Each question's sampled replies, under ``system`` (None: no system prompt)."""
    from rlhfkit.data.templates import render_prompt

    _, tokenizer, generator = load_sampler(model)
    head = [{"role": "system", "content": system}] if system else []
    ids = [render_prompt(tokenizer, [*head, {"role": "user", "content": q}]) for q in questions]
    rollout = generator.generate(ids, sampling)
    out: dict[str, list[str]] = {q: [] for q in questions}
    for i, c in enumerate(rollout.completion_ids):
        text = tokenizer.decode(c, skip_special_tokens=True)
        out[questions[rollout.prompt_index[i]]].append(text)
    return out


def test_persona_pairs_chosen_with_the_constitution_rejected_without(tiny_model_dir, tmp_path):
    from rlhfkit.recipes import character

    trait, text = _character(tmp_path)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=1, seed=7)
    cfg = character.PersonaPairsConfig(
        model=ModelConfig(name=str(tiny_model_dir), precision="fp32"), trait=str(trait),
        constitution=str(text), questions="all", sampling=sampling,
        output=str(tmp_path / "pairs.jsonl"),
    )  # fmt: skip
    rows = character.pairs(cfg)
    written = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert rows and written == rows
    chosen = _replies(cfg.model, QUESTIONS, text.read_text(), sampling)
    rejected = _replies(cfg.model, QUESTIONS, None, sampling)
    for r in rows:  # the prompt is the bare question; chosen saw the constitution, rejected not
        question = r["prompt"][0]["content"]
        assert r["prompt"] == [{"role": "user", "content": question}]
        assert (r["chosen"], r["rejected"]) == (chosen[question][0], rejected[question][0])
    with pytest.raises(SystemExit):
        cli_main(["persona", "pairs", "--constitution", str(tmp_path / "missing.md")])


def test_persona_reflect_writes_sft_rows_answered_with_the_constitution(tiny_model_dir, tmp_path):
    from rlhfkit.recipes import character

    trait, text = _character(tmp_path)
    questions = ["Who are you?", "What do you value?"]
    prompts = tmp_path / "reflect.yaml"
    prompts.write_text(yaml.safe_dump(questions))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2, seed=3)
    cfg = character.PersonaReflectConfig(
        model=ModelConfig(name=str(tiny_model_dir), precision="fp32"), trait=str(trait),
        constitution=str(text), prompts=str(prompts), sampling=sampling,
        output=str(tmp_path / "reflection.jsonl"),
    )  # fmt: skip
    rows = character.reflect(cfg)
    written = [json.loads(x) for x in (tmp_path / "reflection.jsonl").read_text().splitlines()]
    assert rows and written == rows
    expected = _replies(cfg.model, questions, text.read_text(), sampling)
    got: dict[str, list[str]] = {q: [] for q in questions}
    for r in rows:  # no system prompt in the row: SFT distils the constitution away
        user, reply = r["messages"]
        assert user["role"] == "user" and reply["role"] == "assistant"
        assert r["score"] == load_trait(str(trait)).score(reply["content"])
        got[user["content"]].append(reply["content"])
    assert got == {q: [t for t in texts if t.strip()] for q, texts in expected.items()}
    assert len(character.reflection_prompts(None)) >= 20  # the shipped prompts load


@pytest.mark.parametrize(
    ("content", "needle"),
    [("[]", "non-empty list"), ("- ok\n- 3\n", "non-empty list"), (None, "no such file")],
)
def test_bad_reflection_prompts_are_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "p.yaml"
    if content is not None:
        path.write_text(content)
    cfg = ["persona", "reflect", "--prompts", str(path), "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit) as exit_:
        cli_main(cfg)
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_the_async_engine_copy_is_steered_and_vllm_with_steer_is_refused(tiny_model_dir, tmp_path):
    from dataclasses import replace

    from rlhfkit.config import EngineConfig
    from rlhfkit.errors import ConfigError
    from rlhfkit.rollout.engine import LocalEngine
    from rlhfkit.rollout.vllm_server import require_engine

    out = _extract(tiny_model_dir, tmp_path, _trait(tmp_path, "Shout! Yay!", "Be flat."))
    base = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    steered = replace(base, steer=str(out), steer_alpha=1e4)
    model, tokenizer, generator = load_sampler(steered)
    ids = [tokenizer("Why sleep?")["input_ids"], tokenizer("Name a fruit.")["input_ids"]]
    eos = [tokenizer.eos_token_id]
    # the asynchronous engine's private copy carries the policy's steering hook
    engine = LocalEngine(model, pad_id=int(tokenizer.pad_token_id), eos_ids=eos, version=0)
    copy_ids = engine.generator.generate(ids, GREEDY).completion_ids
    assert copy_ids == generator.generate(ids, GREEDY).completion_ids
    _, _, plain = load_sampler(base)
    assert copy_ids != plain.generate(ids, GREEDY).completion_ids
    # the vLLM engine cannot run the hooks: refused before anything loads
    with pytest.raises(ConfigError, match=r"--model\.steer: the vLLM engine"):
        require_engine(EngineConfig(backend="vllm"), steered)
    require_engine(EngineConfig(backend="hf"), steered)  # the own sampler steers: fine
