"""Where dataset rows come from: local files, the Hugging Face Hub and the built-in tasks.

``load_rows`` turns a source spec into a list of :class:`Row` records, each carrying a
human-readable location so that every later error can say exactly where the bad row is
(source spec: location of a row):

- JSON lines ``data/train.jsonl``: ``data/train.jsonl:17`` (the line number);
- JSON, CSV, Parquet ``data/train.csv``: ``data/train.csv:row 17``;
- built-in ``builtin:instructions``: ``builtin:instructions[train]:row 17``;
- Hugging Face Hub ``owner/name``: ``hub:owner/name[train]:row 17``.

Line and row numbers are 1-based. For ``.jsonl`` the number is the line in the file (blank lines
are skipped but still counted), so it matches what an editor shows. A local file is a single
split: ``split`` only selects among the splits of hub and built-in sources.

JSON lines are parsed here, line by line, so that a malformed line is reported with its line
number; the other formats go through ``datasets`` (imported lazily: it is slow to import and
only needed when such a file is actually read).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
"""Prefix of a built-in dataset spec, e.g. ``builtin:instructions``."""


@dataclass(frozen=True)
class Row:
    """One raw record of a dataset and where it came from.

    Attributes:
        data: The record as read (a JSON object / table row), not yet validated.
        location: Human-readable position, e.g. ``"data/train.jsonl:17"`` or
            ``"hub:owner/name[train]:row 17"``; used as the prefix of every error about the row.
    """

    data: dict[str, Any]
    location: str


class DataError(ValueError):
    """A problem with one dataset row (or source), located precisely.

    ``str(err)`` reads ``"{location}: field '{field}': {reason}"``, or ``"{location}: {reason}"``
    when the problem is not tied to one field.

    Attributes:
        location: Where the row is (``Row.location``), e.g. ``"data.jsonl:4"``.
        field: The offending field as a path into the row (``"messages[2].role"``), or None.
        reason: What is wrong and, where obvious, how to fix it.
    """

    def __init__(self, location: str, field: str | None, reason: str) -> None:
        self.location = location
        self.field = field
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.field is None:
            return f"{self.location}: {self.reason}"
        return f"{self.location}: field '{self.field}': {self.reason}"

    def __reduce__(self) -> tuple[type[DataError], tuple[str, str | None, str]]:
        # Keeps the error picklable (multiprocessing data loaders) despite the custom __init__.
        return (DataError, (self.location, self.field, self.reason))


def load_rows(source: str, *, split: str = "train", limit: int | None = None) -> list[Row]:
    """Read the raw rows of a dataset.

    Args:
        source: A local file (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``, chosen by
            suffix), a built-in dataset ``builtin:NAME`` (see ``rlhfkit.data.tasks``), or
            otherwise the name of a Hugging Face Hub dataset (``owner/name``).
        split: Split of a hub or built-in dataset (``"train"``/``"heldout"`` for built-ins).
            Ignored for local files, which hold a single split.
        limit: Keep at most this many rows (the first ones); None keeps all.

    Returns:
        The rows in file order, each with its location.

    Raises:
        FileNotFoundError: A local file path that does not exist.
        DataError: A malformed file or line, or a hub dataset that cannot be loaded.
        ValueError: An unsupported file suffix, an unknown built-in name or split, or a
            negative ``limit``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        rows = _read_builtin(source.removeprefix(BUILTIN_PREFIX), split)
    else:
        path = Path(source)
        reader = _LOCAL_READERS.get(path.suffix.lower())
        if reader is not None:
            if not path.is_file():
                raise FileNotFoundError(f"{source}: no such file (resolved to {path.resolve()})")
            rows = reader(path, source, limit)
        elif path.is_file():
            raise ValueError(
                f"{source}: unsupported file type '{path.suffix}'; use one of "
                f"{', '.join(sorted(_LOCAL_READERS))}"
            )
        else:
            rows = _read_hub(source, split, limit)
    return rows if limit is None else rows[:limit]


def _read_jsonl(path: Path, source: str, limit: int | None) -> list[Row]:
    """Parse a JSON-lines file line by line, locating rows by 1-based line number."""
    rows: list[Row] = []
    with path.open("rb") as handle:  # bytes: only b"\n" ends a line, as in an editor
        for lineno, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            location = f"{source}:{lineno}"
            text = _decode_line(raw, location, first=lineno == 1)
            if not text.strip():
                continue
            rows.append(Row(data=_parse_json_object(text, location), location=location))
    return rows


def _decode_line(raw: bytes, location: str, *, first: bool) -> str:
    """Decode one line as UTF-8 (dropping a byte-order mark on the first line)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            location,
            None,
            f"not valid UTF-8 ({err.reason} at byte {err.start + 1}); re-save the file as UTF-8",
        ) from err


def _parse_json_object(text: str, location: str) -> dict[str, Any]:
    """Parse one JSON-lines record, which must be a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            location,
            None,
            f"invalid JSON ({err.msg} at column {err.colno}). Fix the line or remove it.",
        ) from err
    if not isinstance(value, dict):
        raise DataError(
            location,
            None,
            f"expected a JSON object ({{...}}) on each line, got {type(value).__name__}",
        )
    return value


def _datasets_reader(builder: str) -> Callable[[Path, str, int | None], list[Row]]:
    """Make a reader that loads a local file with ``datasets.load_dataset(builder, ...)``."""

    def read(path: Path, source: str, limit: int | None) -> list[Row]:
        import datasets  # lazy: heavy import, only needed for these formats

        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
            cause = err.__cause__ or err
            raise DataError(source, None, f"could not read the file as {builder}: {cause}") from err
        return _rows_from_dataset(dataset, lambda i: f"{source}:row {i}", limit)

    return read


def _read_hub(name: str, split: str, limit: int | None) -> list[Row]:
    """Load a Hugging Face Hub dataset split; locations read ``hub:NAME[SPLIT]:row N``."""
    import datasets  # lazy: heavy import, only needed for hub sources

    prefix = f"hub:{name}[{split}]"
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as err:  # ConnectionError and not-found errors are OSErrors
        raise DataError(
            prefix,
            None,
            f"could not load '{name}' (split '{split}') from the Hugging Face Hub: {err}. "
            "Check the dataset name, the split and your network; a local file needs one of "
            f"the suffixes {', '.join(sorted(_LOCAL_READERS))}.",
        ) from err
    return _rows_from_dataset(dataset, lambda i: f"{prefix}:row {i}", limit)


def _rows_from_dataset(dataset: Any, locate: Callable[[int], str], limit: int | None) -> list[Row]:
    """Convert a ``datasets.Dataset`` to rows, numbering them from 1."""
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return [Row(data=record, location=locate(i)) for i, record in enumerate(dataset.to_list(), 1)]


def _read_builtin(name: str, split: str) -> list[Row]:
    """Rows of a built-in dataset (``rlhfkit.data.tasks``)."""
    # Imported here because the tasks package builds Row objects from this module.
    from rlhfkit.data.tasks import builtin_rows

    return builtin_rows(name, split)


_LOCAL_READERS: dict[str, Callable[[Path, str, int | None], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _datasets_reader("json"),
    ".parquet": _datasets_reader("parquet"),
    ".csv": _datasets_reader("csv"),
}
"""File suffix -> reader(path, source spec, limit)."""
