"""Error types shared by the API and the CLI.

Every error lnfuse raises on purpose derives from :class:`LnfuseError` and carries a
one-line, user-facing message plus the process exit code the CLI maps it to:

* ``InputError`` (exit 2): the input cannot be used (missing file, not ONNX, truncated,
  missing or unsafe external data, unsupported opset, bad output path, ...).
* ``ProviderError`` (exit 2): an explicitly requested execution provider cannot start.
* ``ValidationError`` (exit 1): a numeric check of a candidate model failed.
"""

from __future__ import annotations


class LnfuseError(Exception):
    """Base class: ``str(err)`` is a single line meant for the user."""

    exit_code: int = 2


class InputError(LnfuseError):
    """The input (model, path, option value) cannot be used."""

    exit_code = 2


class ProviderError(LnfuseError):
    """A requested ONNX Runtime execution provider is unavailable."""

    exit_code = 2


class ValidationError(LnfuseError):
    """A candidate model failed the numeric-equivalence check."""

    exit_code = 1
