"""A store's chat template, rendered the way transformers' `apply_chat_template` renders it: a sandboxed
jinja2 environment with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII, and the tokenizer's special tokens as variables (tests/unit/test_chat_template.py compares
with transformers). The rendered text is tokenized without adding special tokens, as transformers does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from d2moe.storage.format import StoreError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: dict[str, str]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=None, documents=None, **self.special_tokens)
        except TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@lru_cache(maxsize=8)  # a pure function of the source: compiled once per template
def _compile(source: str):
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_chat_template(store: Path) -> ChatTemplate | None:
    """The template in tokenizer_config.json (a string, or the one named "default" in a list) or in
    chat_template.jinja; None if the store has none."""
    store = Path(store)
    cfg_file = store / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{cfg_file}: cannot read ({e})") from None
    source = cfg.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = store / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.is_file():
        source = jinja_file.read_text()
    if not isinstance(source, str):
        return None
    special = {k: t for k in SPECIAL_KEYS if (t := _token_text(cfg.get(k))) is not None}
    from jinja2.exceptions import TemplateError

    try:
        _compile(source)  # a template that does not parse is the store's problem, said at start
    except TemplateError as e:
        raise StoreError(f"{store}: the chat template does not parse ({e})") from None
    return ChatTemplate(source, special)
