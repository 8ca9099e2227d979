"""What every module of the config package shares: the strict pydantic base of each section, the error a
bad recipe raises, pydantic's errors phrased as that error's one line, and where recipe paths point."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A user error in a recipe: the message names the file and key."""


class StrictModel(BaseModel):
    # strict: `train_steps: true` is not 1 and `lr: "1"` not 1.0; no inf or nan anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def resolve_path(path: str) -> Path:
    """Paths in recipes are relative to the working directory, falling back to the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def validation_problems(err: ValidationError, section: tuple[str, ...] = ()) -> str:
    """pydantic's errors as `section.key: message; ...`."""
    problems = []
    for error in err.errors():
        key = ".".join(str(p) for p in (*section, *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(key) else f"{key}: {message}")  # validators name keys
    return "; ".join(problems)
