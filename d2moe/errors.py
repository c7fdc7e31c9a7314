"""The errors the CLI reports as one line (anything else is a bug and keeps its traceback)."""

from __future__ import annotations

from d2moe.cache.expert_cache import BudgetError
from d2moe.convert.families import ConversionError
from d2moe.storage.format import StoreError

USER_ERRORS: tuple[type[BaseException], ...] = (
    StoreError,
    ConversionError,
    BudgetError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ValueError,
)
