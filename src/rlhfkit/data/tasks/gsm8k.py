r"""GSM8K-format word problems as verifiable rows, loadable as ``load_rows("gsm8k:PATH")``.

A GSM8K-format file holds one JSON object per line with a ``question`` and an ``answer`` whose
last ``#### `` marker is followed by the final number::

    {"question": "Tom has 3 boxes of 4 apples. How many apples?",
     "answer": "3 boxes * 4 apples = <<3*4=12>>12 apples.\n#### 12"}

Each becomes a ``verifiable`` row checked by the ``math`` verifier::

    {"prompt": question + ANSWER_INSTRUCTION, "answer": "12",
     "solution": "3 boxes * 4 apples = 12 apples.", "verifier": "math", "task": "gsm8k"}

- ``answer``: the text after the last ``####``, stripped, with thousands commas (and a leading
  ``$``) removed; it must be a number (``-?\d+(\.\d+)?``).
- ``solution``: the text before the last ``####``, stripped, with the calculator annotations
  ``<<...>>`` removed (they are not part of the written reasoning).
- Other fields of the input row (e.g. an id) are kept unless they would overwrite one of these.

The path may be any local file ``load_rows`` reads (``.jsonl``, ``.json``, ``.parquet``,
``.csv``; ``.jsonl`` locates rows by line number); a bad row raises
:class:`~rlhfkit.data.rows.DataError` naming the file, the row and the field, e.g.
``train.jsonl:3: field 'answer': no '####' marker ...``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlhfkit.data.rows import DataError, Row, read_file
from rlhfkit.errors import MissingFileError

PREFIX = "gsm8k:"
"""Source prefix of a GSM8K-format file."""

MARKER = "####"
ANSWER_INSTRUCTION = (
    "\n\nSolve the problem step by step, then write the final answer on the last line as "
    '"#### <number>".'
)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CALCULATOR = re.compile(r"<<[^<>]*>>")


def convert(data: dict[str, Any], location: str) -> dict[str, Any]:
    """One GSM8K-format record as a verifiable row.

    Args:
        data: The record (``question`` and ``answer`` strings).
        location: Where it came from, for errors (e.g. ``"train.jsonl:3"``).

    Returns:
        The row described in the module docstring.

    Raises:
        DataError: A missing or non-string field, an answer without ``####`` or whose final
            answer is not a number.
    """
    for field in ("question", "answer"):
        value = data.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "nothing" if field not in data else repr(value)
            raise DataError(location, field, f"expected a non-empty string, got {got}")
    reasoning, marker, final = data["answer"].rpartition(MARKER)
    if not marker:
        raise DataError(
            location, "answer", "no '####' marker; GSM8K answers end with '#### <number>'"
        )
    number = final.strip().replace(",", "").removeprefix("$")
    if not NUMBER.fullmatch(number):
        raise DataError(
            location, "answer", f"expected a number after '####', got {final.strip()!r}"
        )
    row = {key: value for key, value in data.items() if key not in ("question", "answer")}
    row.update(
        {
            "prompt": data["question"].strip() + ANSWER_INSTRUCTION,
            "answer": number,
            "solution": CALCULATOR.sub("", reasoning).strip(),
            "verifier": "math",
            "task": "gsm8k",
        }
    )
    return row


def gsm8k_rows(path: str | Path, *, limit: int | None = None) -> list[Row]:
    """Rows of a GSM8K-format file, converted and located as ``PATH:LINE`` (JSON lines).

    Args:
        path: A local file (``.jsonl``, or another format ``load_rows`` reads).
        limit: Keep at most this many rows (the first ones); None keeps all.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: A malformed line or record (file, line and field in the message).
    """
    source = str(path)
    if not Path(source).is_file():
        raise MissingFileError(
            f"{PREFIX}{source}: no such file (resolved to {Path(source).resolve()})"
        )
    return [
        Row(data=convert(row.data, row.location), location=row.location)
        for row in read_file(source, limit)
    ]


def load_gsm8k(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a GSM8K-format file into verifiable rows (dicts, in file order).

    Args:
        path: A local file (``.jsonl``, or another format ``load_rows`` reads).
        limit: Keep at most this many rows (the first ones); None keeps all.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: A malformed line or record (file, line and field in the message).
    """
    return [row.data for row in gsm8k_rows(path, limit=limit)]
