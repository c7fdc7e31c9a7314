"""Serving pieces alone: the chat template against transformers, incremental detokenization with stop
strings, and the engine thread (abort frees the slot, a failed step fails its requests, not the thread)."""

from __future__ import annotations

import json
import queue

import pytest
import torch

from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.batcher import BatcherConfig
from d2moe.engine.chat_template import load_chat_template
from d2moe.engine.detok import Detokenizer
from d2moe.engine.engine import Engine
from d2moe.engine.loop import EngineLoop
from d2moe.engine.model import open_model
from d2moe.engine.request import EngineRequest

CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLISH = ("{{ bos_token }}{%- for m in messages %}\n  {%- if m['role'] == 'user' %}[U] {{ m['content'] | trim }}"
           "{% elif m['role'] == 'assistant' %}[A] {{ m['content'] }}{{ eos_token }}{% else %}"
           "{{ raise_exception('bad role') }}{% endif %}\n{%- endfor %}{{ {'x': 'é'} | tojson }}")


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["mixtral"], tmp_path_factory.mktemp("pieces") / "tiny.d2m", progress=False)


@pytest.mark.parametrize("template", [CHATML_WITH_DEFAULT_SYSTEM, TOOLISH])
def test_chat_template_renders_like_transformers(tmp_path, store, template):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((store / "tokenizer.json").read_bytes())
    cfg = {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"},
           "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    ours = load_chat_template(tmp_path).render(messages, add_generation_prompt=True)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>",
                                              eos_token="</s>")
    theirs = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    if template is TOOLISH:
        with pytest.raises(ValueError, match="bad role"):
            load_chat_template(tmp_path).render([{"role": "system", "content": "x"}])


def test_default_model_template_renders_chatml():
    from d2moe.default_model.paths import default_model_dir

    t = load_chat_template(default_model_dir())
    if t is None:
        pytest.skip("default model not built")
    text = t.render([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_detokenizer_holds_back_stop_prefixes_and_partial_characters(store):
    from d2moe.engine.model import load_tokenizer

    tok = load_tokenizer(store)
    d = Detokenizer(tok, ("STOP",))
    text = "héllo wSTOP and more"
    out = "".join(d.add(t) for t in tok.encode(text).ids)
    assert out == "héllo w" and d.stopped
    d = Detokenizer(tok, ("xyz",))
    pieces = [d.add(t) for t in tok.encode("aé xy").ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "aé " and d.flush() == "xy"


def _loop(store, max_batch=2):
    model = open_model(store, EngineConfig(context=200, kv_slots=max_batch))
    return model, EngineLoop(Engine(model, BatcherConfig(max_batch, 16, 32), 200)).start()


def _drain(q: queue.SimpleQueue, timeout=60):
    outs = []
    while True:
        out = q.get(timeout=timeout)
        outs.append(out)
        if out.finished:
            return outs


def test_engine_thread_abort_frees_the_slot(store, one_thread):
    model, loop = _loop(store)
    try:
        q: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit("a", EngineRequest((1, 2, 3), 150, stop_on_eos=False), q.put)
        q.get(timeout=60)  # running
        loop.abort("a")
        outs = _drain(q)
        assert outs[-1].finish_reason == "abort"
        assert loop.engine.pool.free_slots == 2
        done: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit("b", EngineRequest((1, 2), 3, stop_on_eos=False), done.put)
        assert _drain(done)[-1].finish_reason == "length"
        bad: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit("c", EngineRequest((1,) * 150, 100), bad.put)  # longer than the context
        assert "exceeds the context" in _drain(bad)[-1].error
    finally:
        loop.close()
        model.close()


def test_failed_step_fails_requests_and_the_thread_keeps_serving(store, one_thread, monkeypatch):
    model, loop = _loop(store)
    try:
        calls = {"n": 0}
        real = loop.engine.runner.step

        def flaky(batch, seqs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("disk on fire")
            return real(batch, seqs)

        monkeypatch.setattr(loop.engine.runner, "step", flaky)
        q: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit("a", EngineRequest((1, 2, 3), 4), q.put)
        out = _drain(q)[-1]
        assert out.finish_reason == "error" and "disk on fire" in out.error
        assert loop.engine.pool.free_slots == 2
        q2: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit("b", EngineRequest((1, 2, 3), 4, stop_on_eos=False), q2.put)
        assert _drain(q2)[-1].finish_reason == "length"
    finally:
        loop.close()
        model.close()


def test_request_timeout_aborts_and_is_a_504():
    import asyncio

    pytest.importorskip("fastapi")
    from d2moe.server.protocol import ServerError
    from d2moe.server.streaming import collect

    class Silent:  # an engine that never answers
        aborted = False

        async def generate(self, rid, er):
            try:
                await asyncio.sleep(3600)
                yield None
            finally:
                Silent.aborted = True

    with pytest.raises(ServerError) as e:
        asyncio.run(collect(Silent(), "r", EngineRequest((1,), 4), timeout=0.05))
    assert e.value.status == 504 and Silent.aborted
