"""Reading files a user hands over: every problem becomes an `InputFileError` naming the file and
the dotted field, e.g. ``runs/demo/metrics.json: field 'image_size': expected a list of two
positive integers [H, W], got '32x48'``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parsimony.errors import InputFileError, one_line, shown

PositiveInt = Annotated[int, Field(ge=1)]
Index = Annotated[int, Field(ge=0)]


class Schema(BaseModel):
    """Strict: a string is not an int, 16.0 is not 16, unknown keys are refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


def read_json(path: str | Path, what: str) -> dict:
    """The JSON object in ``path``; ``what`` says what the file is (for the message)."""
    return read_mapping(Path(path), what, "JSON", json.loads, (json.JSONDecodeError,))


def read_mapping(path: Path, what: str, fmt: str, parse: Callable[[str], Any],
                 errors: tuple[type[Exception], ...]) -> dict:
    """The mapping ``parse`` finds in the text of ``path`` (``fmt`` names the format in messages)."""
    if not path.is_file():
        raise InputFileError(f"{path}: {what} not found")
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, *errors) as exc:
        raise InputFileError(f"{path}: {what} is not valid {fmt} ({one_line(exc)}); the file is truncated or "
                             f"corrupt") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: {what} must hold a {fmt} mapping at the top level, got a "
                             f"{type(data).__name__}")
    return data


def validate(schema: type[BaseModel], data: Any, path: str | Path, prefix: str = "") -> BaseModel:
    """``schema.model_validate(data)``; every problem is reported with its dotted field name
    (``prefix`` first, for a section of a larger file)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise InputFileError(f"{path}: " + "; ".join(_describe(e, prefix) for e in exc.errors())) from None


def _describe(error: Mapping, prefix: str) -> str:
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *error["loc"])) or "(top level)"
    if error["type"] == "missing":
        return f"field '{loc}': missing"
    if error["type"] == "extra_forbidden":
        return f"field '{loc}': not expected here (check the spelling)"
    return f"field '{loc}': {error['msg'].lower()}, got {shown(error.get('input'))}"
