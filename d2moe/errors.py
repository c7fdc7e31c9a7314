"""The errors the CLI reports as one line (anything else is a bug and keeps its traceback)."""

from __future__ import annotations

from d2moe.cache.expert_cache import BudgetError
from d2moe.convert.families import ConversionError
from d2moe.storage.format import StoreError


class MissingDependency(RuntimeError):
    """An optional extra is not installed (e.g. `d2moe serve` without d2moe[serve])."""


class ServeError(RuntimeError):
    """The server cannot start (e.g. its port is taken)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingDependency,
    ServeError,
    StoreError,
    ConversionError,
    BudgetError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ValueError,
)
