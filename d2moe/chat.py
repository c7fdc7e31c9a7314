"""`d2moe chat`: an interactive terminal chat over the serving engine (chat template, streamed tokens,
history). `/reset` clears the history, `/exit` (or EOF) quits, Ctrl-C stops the current answer and keeps
the session. The engine runs on its own thread, so Ctrl-C only interrupts the wait for tokens here and the
answer is aborted at the next step boundary."""

from __future__ import annotations

import itertools
import logging
import queue
import sys
from dataclasses import dataclass
from typing import TextIO

from d2moe.engine.chat_template import ChatTemplate
from d2moe.engine.loop import EngineLoop
from d2moe.engine.request import EngineRequest


@dataclass(frozen=True)
class ChatConfig:
    bits: int = 8
    price: float | None = None
    max_tokens: int = 512  # per answer (less if the context is nearly full)
    temperature: float = 0.0
    top_p: float = 1.0
    system: str | None = None

    def __post_init__(self) -> None:  # the same checks a request gets, before the first message
        EngineRequest((0,), self.max_tokens, self.temperature, self.top_p, bits=self.bits, price=self.price)


log = logging.getLogger("d2moe")
HELP = "d2moe chat: type a message; /reset clears the history, /exit quits, Ctrl-C stops an answer"


def chat_session(loop: EngineLoop, template: ChatTemplate, cfg: ChatConfig, stdin: TextIO = sys.stdin,
                 stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    tok, context = loop.engine.tokenizer, loop.engine.context
    interactive = stdin.isatty()
    history: list[dict[str, str]] = []
    ids = itertools.count()
    print(HELP, file=stderr)
    while True:
        try:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            continue
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=stderr)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; /reset or /exit)", file=stderr)
            continue
        turn = history + [{"role": "user", "content": text}]
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + turn
        prompt = tok.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
        log.debug("prompt: %d tokens (%d earlier messages)", len(prompt), len(history))
        room = context - len(prompt)
        if room < 1:
            print("(the conversation no longer fits the context; /reset to start over)", file=stderr)
            continue
        request = EngineRequest(tuple(prompt), min(cfg.max_tokens, room), cfg.temperature, cfg.top_p,
                                bits=cfg.bits, price=cfg.price)
        answer = _answer(loop, f"chat-{next(ids)}", request, stdout, stderr)
        history = turn + [{"role": "assistant", "content": answer}]


def _answer(loop: EngineLoop, rid: str, request: EngineRequest, stdout: TextIO, stderr: TextIO) -> str:
    outs: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(rid, request, outs.put)
    answer = ""
    try:
        while True:
            try:
                out = outs.get(timeout=0.1)  # short waits: Ctrl-C lands promptly
            except queue.Empty:
                continue
            stdout.write(out.text)
            stdout.flush()
            answer += out.text
            if out.finished:
                if out.finish_reason == "error":
                    print(f"\n(error: {out.error})", file=stderr)
                break
    except KeyboardInterrupt:
        loop.abort(rid)
        stdout.write("\n")
        print("(stopped)", file=stderr)
        return answer
    stdout.write("\n")
    stdout.flush()
    return answer
