"""Facts the README and the documentation state about the code, checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

from rlhfkit.data.tasks.instructions import TASKS

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NUMBERS = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16,
}  # fmt: skip


def _text(page: Path) -> str:
    return re.sub(r"\s+", " ", page.read_text())


def test_the_count_of_instruction_task_types_is_the_codes():
    found = []
    for page in PAGES:
        for match in re.finditer(r"\b(\d+|[a-z]+) task types\b", _text(page)):
            word = match.group(1)
            count = int(word) if word.isdigit() else NUMBERS.get(word)
            if count is not None:
                found.append((page.name, count))
    assert found, "no page states the number of task types any more: drop this test"
    assert all(count == len(TASKS) for _, count in found), (found, len(TASKS))


def test_checkpoint_directories_are_named_as_the_code_names_them():
    from rlhfkit.training import checkpoint

    source = Path(checkpoint.__file__).read_text()
    assert 'f"step-{state.step:08d}"' in source  # the format the pages below describe
    for page in PAGES:
        for name in re.findall(r"checkpoints/(step-[^/`\s]+)", page.read_text()):
            assert re.fullmatch(r"step-\d{8}", name), (page.name, name)
