"""The errors a user can fix (one line naming the problem and the fix), shared by every stage and the config code."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """An error the user can fix: `str(e)` is ONE line naming the problem and the fix; `details` (optional,
    several lines, e.g. the last lines of verl's log) is printed above it."""

    def __init__(self, message: str, *, details: str = ""):
        super().__init__(message)
        self.details = details


class ConfigError(PipelineError, ValueError):
    """A config value a stage rejects before it touches anything on disk."""
