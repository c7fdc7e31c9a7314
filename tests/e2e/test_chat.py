"""`d2moe chat` driven through stdin in a subprocess: streamed answers with history, /reset, /exit, EOF."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from d2moe.convert.convert import convert
from server_fixture import with_chat_template


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return with_chat_template(convert(tiny_checkpoints["mixtral"], root / "base.d2m", progress=False),
                              root / "tiny.d2m")


def chat(store, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2moe.cli", "-v", "chat", "--model", str(store), "--threads", "1",
                           "--context", "250", "--max-tokens", "6", *args],
                          input=stdin, capture_output=True, text=True, timeout=300, env={**os.environ})


def test_history_reset_and_exit(store):
    r = chat(store, "Hi\nHi\n/reset\nHi\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.split("\n")[:3]
    # the second "Hi" sees the first exchange in its prompt; after /reset the third is the first again
    assert answers[2] == answers[0], r.stdout
    history = [line.split("(")[1] for line in r.stderr.splitlines() if "prompt:" in line]
    assert history == ["0 earlier messages)", "2 earlier messages)", "0 earlier messages)"], r.stderr
    assert "(history cleared)" in r.stderr and "Traceback" not in r.stderr


def test_eof_exits_cleanly_and_bad_command_is_explained(store):
    r = chat(store, "/nope\nHello")  # no newline at the end, then EOF
    assert r.returncode == 0, r.stderr
    assert "unknown command /nope" in r.stderr and r.stdout.strip()


def test_store_without_template_is_a_one_line_error(tiny_checkpoints, tmp_path):
    plain = convert(tiny_checkpoints["mixtral"], tmp_path / "plain.d2m", progress=False)
    r = chat(plain, "Hi\n")
    assert r.returncode == 2 and "no chat template" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_the_answer_and_keeps_the_session(store):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "d2moe.cli", "chat", "--model", str(store), "--threads", "1",
                             "--context", "250", "--max-tokens", "220", "--temperature", "0.8"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ},
                            # as at a terminal: a test run started as a background job inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("Hi\n")
        proc.stdin.flush()
        proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "(stopped)" in err and "Traceback" not in err
