"""Training works without the optional extras; a feature that needs one names it.

Each check runs in a fresh interpreter in which the packages of the extras (``app``, ``plot``,
``rgym``) cannot be imported, as if ``pip install rlhfkit`` had been run without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhfkit.extras import EXTRAS, MissingExtraError, import_optional, install_hint, require_extra

BLOCKED = (
    "fastapi",
    "starlette",
    "uvicorn",
    "jinja2",
    "markupsafe",
    "multipart",
    "python_multipart",
    "markdown_it",
    "matplotlib",
    "reasoning_gym",
)
"""Top-level modules made unimportable in the child interpreter."""

# As if not installed: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x")
# returns None. (A meta-path finder that raises would not do: find_spec would raise too, and
# transformers probes optional packages with find_spec at import.)
BLOCKER = f"""
import sys

BLOCKED = {BLOCKED!r}
for name in BLOCKED:
    sys.modules[name] = None
"""


def _run(body: str, tmp_path: Path) -> dict:
    """Run ``body`` after the blocker in a child interpreter; its last stdout line is JSON."""
    script = tmp_path / "child.py"
    script.write_text(BLOCKER + textwrap.dedent(body))
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blocked_modules_cover_the_extras() -> None:
    assert {m for modules in EXTRAS.values() for m in modules} <= set(BLOCKED)


def test_training_imports_without_extras(tmp_path: Path) -> None:
    result = _run(
        """
        import contextlib
        import importlib
        import io
        import json

        import rlhfkit.cli
        from rlhfkit.cli import COMMANDS

        modules = {
            "rlhfkit.recipes.sft",
            "rlhfkit.recipes.dpo",
            "rlhfkit.recipes.reward_model",
            COMMANDS["rl"][0],  # the policy-gradient recipe, wherever it lives
        }
        modules |= {entry[0] for entry in COMMANDS.values()}  # every command's module
        for name in sorted(modules):
            importlib.import_module(name)
        usage = io.StringIO()
        with contextlib.redirect_stdout(usage):
            rlhfkit.cli.main(["--help"])
        sft_help = io.StringIO()
        with contextlib.redirect_stdout(sft_help), contextlib.suppress(SystemExit):
            rlhfkit.cli.main(["sft", "--help"])
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            blocker_works = True
        else:
            blocker_works = False
        print(json.dumps({
            "imported": sorted(modules),
            "usage": usage.getvalue(),
            "sft_help": sft_help.getvalue(),
            "blocker_works": blocker_works,
        }))
        """,
        tmp_path,
    )
    assert "rlhfkit.recipes.sft" in result["imported"]
    assert "usage: rlhfkit <command>" in result["usage"]
    assert "--loop.batch-size" in result["sft_help"] or "--loop.batch_size" in result["sft_help"]
    assert result["blocker_works"]


FEATURES = """
import json
import sys
from pathlib import Path

from rlhfkit.extras import MissingExtraError

CHECKS = {}


def check(name):
    def run(fn):
        try:
            fn()
        except MissingExtraError as err:
            CHECKS[name] = {"error": str(err)}
        else:
            CHECKS[name] = {"error": None}
        return fn

    return run


@check("label serve")
def _():
    import contextlib
    import io

    from rlhfkit.cli import main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            main(["label", "serve", "--db", "labels.sqlite"])
    except SystemExit as done:  # the command line reports the missing extra, status 2
        assert done.code == 2, done.code
        raise MissingExtraError(stderr.getvalue()) from None


@check("report")
def _():
    from rlhfkit.eval.report import render_report

    render_report({"title": "t"}, "report.html")


@check("pipeline")
def _():
    from rlhfkit.config import LogConfig
    from rlhfkit.pipeline.run import PipelineConfig, main

    main(PipelineConfig(log=LogConfig(run_dir="pipeline-run")))


@check("rgym source")
def _():
    from rlhfkit.data.sources import load_rows

    load_rows("rgym:chain_sum?size=2&heldout_size=1")


@check("rgym verifier")
def _():
    from rlhfkit.rewards import load_reward_fn

    verifier = load_reward_fn("verifier:reasoning_gym")
    verifier("<answer>3</answer>", rg_dataset="chain_sum", rg_entry={"question": "1+2"})


@check("label task")
def _():
    from rlhfkit.feedback.serve import LabelTaskConfig, task_main

    Path("c.jsonl").write_text(json.dumps({"prompt": "hi", "completions": ["a", "b"]}) + "\\n")
    task_main(LabelTaskConfig(db="labels.sqlite", input="c.jsonl", name="t", invite=["ann"]))


CHECKS["files"] = sorted(p.name for p in Path().iterdir())
print(json.dumps(CHECKS))
"""


def test_features_name_their_extra(tmp_path: Path) -> None:
    result = _run(FEATURES, tmp_path)
    expected = {
        "label serve": "app",
        "report": "plot",
        "pipeline": "plot",
        "rgym source": "rgym",
        "rgym verifier": "rgym",
    }
    for check, extra in expected.items():
        error = result[check]["error"]
        assert error is not None, f"{check}: no error without the {extra} extra"
        assert install_hint(extra) in error, f"{check}: {error}"
    # Creating a labelling task needs no extra (the web app is only needed to label).
    assert result["label task"]["error"] is None
    # The checks fail before doing work: no report, no pipeline run directory.
    assert "report.html" not in result["files"]
    assert "pipeline-run" not in result["files"]


def test_import_optional_names_the_extra() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'rlhfkit\[plot\]'") as info:
        import_optional("rlhfkit_no_such_module", "plot", "the HTML report")
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert import_optional("json", "plot", "x").__name__ == "json"
    with pytest.raises(ValueError, match="unknown extra"):
        require_extra("nope", "x")
