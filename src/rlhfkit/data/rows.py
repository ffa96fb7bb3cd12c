"""Raw dataset rows: :class:`Row`, :class:`DataError`, and the readers of files and the Hub.

A row carries a human-readable location so that every later error can say exactly where the bad
row is:

- JSON lines ``data/train.jsonl``: ``data/train.jsonl:17`` (the line number);
- JSON, CSV, Parquet ``data/train.csv``: ``data/train.csv:row 17``;
- Hugging Face Hub ``owner/name``: ``hub:owner/name[train]:row 17``.

Line and row numbers are 1-based. For ``.jsonl`` the number is the line in the file (blank lines
are skipped but still counted), so it matches what an editor shows. JSON lines are parsed here,
line by line, so that a malformed line is reported with its line number; the other formats go
through ``datasets`` (imported lazily: it is slow to import and only needed when such a file is
actually read).

:func:`rlhfkit.data.sources.load_rows` reads any source spec (these, and the built-in and
generated tasks of :mod:`rlhfkit.data.tasks`, which build their rows on this module).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.errors import ConfigError, MissingFileError, UserError

MAX_REPORTED = 10
"""Bad rows listed in one error (the count of all of them is given)."""


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


class DataError(UserError, ValueError):
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


class DataErrors(DataError):
    """Every bad row of a source; ``str(err)`` lists the first :data:`MAX_REPORTED`.

    Its ``location``, ``field`` and ``reason`` are the first row's; with one bad row it reads
    exactly as that row's error.

    Attributes:
        errors: Each bad row's error, in source order.
        rows: The rows that were read correctly, when a reader raises this (a caller may still
            validate them, to report their problems too, or skip the bad rows); else None.
    """

    def __init__(self, errors: list[DataError], rows: list[Row] | None = None) -> None:
        self.errors, self.rows = list(errors), rows
        first = self.errors[0]
        super().__init__(first.location, first.field, first.reason)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        shown = self.errors[:MAX_REPORTED]
        more = f" (the first {len(shown)} below)" if len(self.errors) > len(shown) else ""
        return "\n".join([f"{len(self.errors)} bad rows{more}:", *(f"  {e}" for e in shown)])

    def __reduce__(self) -> tuple[type[DataErrors], tuple[list[DataError], list[Row] | None]]:
        return (DataErrors, (self.errors, self.rows))


def raise_collected(errors: list[DataError]) -> None:
    """Raise the one bad row's error, or :class:`DataErrors` for several; nothing for none."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DataErrors(errors)


def is_local_file(source: str) -> bool:
    """Whether :func:`read_file` reads ``source`` (a supported suffix, or an existing file).

    A spec that is neither names a Hugging Face Hub dataset (:func:`read_hub`).
    """
    path = Path(source)
    return path.suffix.lower() in _LOCAL_READERS or path.is_file()


def read_file(source: str, limit: int | None = None) -> list[Row]:
    """Read the rows of a local file (``.jsonl``, ``.json``, ``.parquet`` or ``.csv``).

    Args:
        source: The file's path; row locations start with it.
        limit: Stop after this many rows (None reads all).

    Returns:
        The rows in file order, each with its location.

    Raises:
        MissingFileError: The file does not exist (a ``FileNotFoundError``).
        ValueError: An unsupported file suffix.
        DataError: An empty or malformed file; :class:`DataErrors` for malformed lines
            (every one, with the rows that parsed).
    """
    path = Path(source)
    reader = _LOCAL_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(
            f"{source}: unsupported file type '{path.suffix}'; use one of "
            f"{', '.join(sorted(_LOCAL_READERS))}"
        )
    if not path.is_file():
        raise MissingFileError(f"{source}: no such file (resolved to {path.resolve()})")
    if path.stat().st_size == 0:
        raise DataError(source, None, "the file is empty")
    return reader(path, source, limit)


def _read_jsonl(path: Path, source: str, limit: int | None) -> list[Row]:
    """Parse a JSON-lines file line by line, locating rows by 1-based line number.

    Every malformed line is found before raising :class:`DataErrors` (which carries the rows
    that parsed).
    """
    rows: list[Row] = []
    errors: list[DataError] = []
    with path.open("rb") as handle:  # bytes: only b"\n" ends a line, as in an editor
        for lineno, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) + len(errors) >= limit:
                break
            location = f"{source}:{lineno}"
            try:
                text = _decode_line(raw, location, first=lineno == 1)
                if not text.strip():
                    continue
                rows.append(Row(data=_parse_json_object(text, location), location=location))
            except DataError as err:
                errors.append(err)
    if errors:
        raise DataErrors(errors, rows)
    if not rows and limit != 0:
        raise DataError(source, None, "the file has no rows (only blank lines)")
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


def read_hub(name: str, split: str, limit: int | None = None) -> list[Row]:
    """Load a Hugging Face Hub dataset split; locations read ``hub:NAME[SPLIT]:row N``.

    Args:
        name: The dataset's Hub name, ``owner/name``.
        split: The split to load.
        limit: Keep this many rows (the first ones); None keeps all.

    Raises:
        DataError: When the dataset or split cannot be loaded.
    """
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


_LOCAL_READERS: dict[str, Callable[[Path, str, int | None], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _datasets_reader("json"),
    ".parquet": _datasets_reader("parquet"),
    ".csv": _datasets_reader("csv"),
}
"""File suffix -> reader(path, source spec, limit)."""

LOCAL_SUFFIXES = tuple(sorted(_LOCAL_READERS))
"""File suffixes :func:`read_file` reads."""
