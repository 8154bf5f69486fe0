"""Reading a site's CSV tables (``clinical.csv``, ``genomics.csv``): UTF-8 only, every problem named by line."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from common.data.contract import MISSING_TOKENS, Problem, _err


def _decode_csv(data: bytes, file: str) -> tuple[str | None, Problem | None]:
    """utf-8 / utf-8-sig only; anything else is an error naming the line of the bad byte."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        # utf-8-sig reports offsets in the data after the BOM
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        bad = data[start : start + 1].hex()
        hint = ""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = " (looks like UTF-16)"
        return None, _err(
            file,
            line,
            None,
            f"not valid UTF-8{hint}: byte 0x{bad} at line {line}, column {col}; "
            "save the file as UTF-8 (other encodings are not guessed)",
        )


@dataclass
class _Table:
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number, column -> stripped cell)


def _read_csv(path: Path, file: str, problems: list[Problem]) -> _Table | None:
    """Read a CSV file; returns None (and records an error) when it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(_err(file, None, None, f"cannot read file: {e.strerror or e}"))
        return None
    text, prob = _decode_csv(data, file)
    if prob is not None:
        problems.append(prob)
        return None
    assert text is not None
    if not text.strip():
        problems.append(_err(file, 1, None, "file is empty (no header line)"))
        return None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    last_line = 0
    try:
        for record in reader:
            start = last_line + 1
            last_line = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in record]
                bad = False
                seen: set[str] = set()
                for i, name in enumerate(header):
                    if not name:
                        problems.append(_err(file, start, None, f"column {i + 1} has an empty name"))
                        bad = True
                    elif name in seen:
                        problems.append(_err(file, start, name, f"duplicated column name '{name}'"))
                        bad = True
                    seen.add(name)
                if bad:
                    return None
                continue
            if len(record) != len(header):
                problems.append(
                    _err(file, start, None, f"expected {len(header)} fields (as in the header), got {len(record)}")
                )
                continue
            rows.append((start, {k: v.strip() for k, v in zip(header, record)}))
    except csv.Error as e:
        problems.append(_err(file, reader.line_num or None, None, f"malformed CSV: {e}"))
        return None
    if header is None:
        problems.append(_err(file, 1, None, "file has no header line"))
        return None
    return _Table(header, rows)


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_TOKENS


def _parse_float(cell: str) -> float:
    v = float(cell)
    if not math.isfinite(v):
        raise ValueError(cell)
    return v


