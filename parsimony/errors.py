"""The error types every offline tool (training, compaction, export, conversion) shares.

Each carries a message that names the file or option, what was wrong and how to fix it; the
command-line tools print that one line and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SHOWN = 60  # characters of an offending value quoted in a message


class InputFileError(ValueError):
    """A user-supplied file is missing, unreadable or holds a wrong field; the message names the
    file, the field and what was expected."""


class ConfigError(ValueError):
    """A configuration (a run config, a model config, a Triton config, a command-line option) is
    invalid; the message names the key and the fix."""


class SpecError(ValueError):
    """A tensor spec is invalid (bad name, dtype or shape); the message says how to fix it."""


class SpecMismatch(ValueError):
    """An ONNX graph does not match its tensor spec; the message lists every difference."""


class ManifestError(InputFileError):
    """A manifest is missing, unreadable or inconsistent; the message names the file and the fix."""


def field_error(path: str | Path, field: str | None, problem: str) -> InputFileError:
    """``InputFileError("<path>: field '<field>': <problem>")`` (without the field part when None)."""
    where = f"{path}: field '{field}'" if field else f"{path}"
    return InputFileError(f"{where}: {problem}")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def shown(value: Any) -> str:
    """``repr(value)`` cut to a length fit for an error message."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
