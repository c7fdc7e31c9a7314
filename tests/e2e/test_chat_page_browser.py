"""The chat page at `/` in a real headless browser: Debian's chromium driven by selenium through the system
chromedriver (`bash scripts/setup.sh --test` installs both when it runs as root on Debian), against a real
`d2moe serve` with an API key on a tiny calibrated store. Asserts on what a person sees: the streamed answer,
its shading and tooltips, the tier actually served, the API key kept across reloads, and a clean console.

`python tests/e2e/test_chat_page_browser.py --screenshot docs/chat_page.png` redoes the README screenshot
(default model, three turns at three tiers)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from server_fixture import running_server, with_chat_template

KEY = "page-key"
TIMEOUT = 60  # seconds for one answer (the tiny model takes well under one)


def _browser_paths() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return browser, shutil.which("chromedriver")


def _skip_reason() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (bash scripts/setup.sh --test installs it)"
    browser, driver = _browser_paths()
    if not browser or not driver:
        return ("no chromium/chromedriver on PATH: `apt-get install chromium chromium-driver` (bash "
                "scripts/setup.sh --test does it when run as root on Debian)")
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def open_browser(width: int = 1200, height: int = 800):
    """Headless chromium through the system chromedriver: an explicit Service path, so Selenium Manager never
    looks for (or downloads) a driver. The browser's console goes to get_log("browser")."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", "--disable-extensions", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return d


def ask(d, text: str, tier: str, timeout: float = TIMEOUT) -> dict:
    """Pick `tier`, type `text` + Enter like a person, wait for the answer to finish; what the last turn shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(d.find_element(By.ID, "tier")).select_by_value(tier)
    turns = len(d.find_elements(By.CSS_SELECTOR, ".turn"))
    d.find_element(By.ID, "input").send_keys(text + "\n")
    WebDriverWait(d, timeout).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.turn').length === arguments[0] && !document.getElementById('send')"
        ".disabled && document.getElementById('stop').disabled", turns + 1))
    return d.execute_script("""
        const turn = [...document.querySelectorAll('.turn')].at(-1), out = turn.querySelector('.assistant');
        const err = out.querySelector('.error');
        return {answer: [...out.childNodes].filter(n => !(n.classList && n.classList.contains('error')))
                          .map(n => n.textContent).join(''),
                spans: [...out.querySelectorAll('.tok')].map(s => ({text: s.textContent, bits: s.dataset.bits,
                        tip: s.dataset.tip, bg: getComputedStyle(s).backgroundColor})),
                error: err ? err.textContent : null, stats: turn.querySelector('.stats').textContent};""")


def width_counters(base: str) -> dict[int, int]:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {int(b): int(n) for b, n in re.findall(r'^d2moe_expert_widths_total\{bits="(\d+)"\} (\d+)$', text, re.M)}


def widths_served(base: str, before: dict[int, int]) -> set[int]:
    after = width_counters(base)
    return {b for b, n in after.items() if n > before.get(b, 0)}


def api_answer(base: str, messages: list[dict], tier: str, max_tokens: int) -> dict:
    body = {"messages": messages, "tier": tier, "max_tokens": max_tokens, "temperature": 0, "d2moe_stats": True}
    r = httpx.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


def severe(log: list[dict]) -> list[dict]:
    return [e for e in log if e["level"] in ("SEVERE", "WARNING")]


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    from d2moe.convert.convert import convert
    from tiny_calibration import calibrate_randomly

    root = tmp_path_factory.mktemp("page")
    store = with_chat_template(convert(tiny_checkpoints["mixtral"], root / "base.d2m", progress=False),
                               root / "tiny.d2m")
    calibrate_randomly(store)  # tiers route widths per token
    with running_server(store, "--context", "256", "--max-batch", "2", "--prefill-chunk", "16",
                        "--api-key", KEY) as base:
        yield base


@pytest.fixture
def browser():
    d = open_browser()
    yield d
    d.quit()


def test_chat_page_in_a_real_browser(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, max_tokens = browser, 12
    d.get(server + "/")
    assert d.title == "d2moe chat" and "shaded by the mean width" in d.find_element(By.ID, "empty").text
    legend = d.find_elements(By.CSS_SELECTOR, "#legend .sw")
    assert [s.text for s in legend] == [str(b) for b in range(2, 9)]
    assert len({s.value_of_css_property("background-color") for s in legend}) == 7
    box = d.find_element(By.ID, "max")
    box.clear()
    box.send_keys(str(max_tokens), Keys.TAB)

    # No key yet: the server's 401 is explained on the page and the key field asks for it.
    shown = ask(d, "Hello", "max")
    assert shown["answer"] == "" and "API key" in shown["error"] and "invalid or missing API key" in shown["error"]
    assert "need" in d.find_element(By.ID, "key").get_attribute("class")
    log = d.get_log("browser")
    assert severe(log) and all(" 401 " in e["message"] for e in severe(log)), log

    # The key (and max tokens) survive a reload: localStorage.
    d.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)
    d.refresh()
    assert d.find_element(By.ID, "key").get_attribute("value") == KEY
    assert d.find_element(By.ID, "max").get_attribute("value") == str(max_tokens)

    # Three turns at three tiers: the page's text == the same greedy request through the API, every token a
    # shaded span with its width and bytes, and the server computed at the tier picked (its width counters).
    history: list[dict] = []
    for prompt, tier, widths in (("Hello there", "min", {2}), ("To be, or not to be", "max", {8}),
                                 ("Once upon a time", "balanced", None)):
        before = width_counters(server)
        shown = ask(d, prompt, tier)
        served = widths_served(server, before)
        assert shown["error"] is None, shown
        history.append({"role": "user", "content": prompt})
        api = api_answer(server, history, tier, max_tokens)
        want, stats = api["choices"][0]["message"]["content"], api["choices"][0]["d2moe"]
        history.append({"role": "assistant", "content": shown["answer"]})
        assert shown["answer"] and shown["answer"] == want, (shown, want)
        spans = shown["spans"]
        assert "".join(s["text"] for s in spans) == want
        for s in spans:
            assert re.fullmatch(r"\d\.\d\d bits, [\d.]+ (B|KiB|MiB) of experts( \(\d+ tokens\))?", s["tip"]), s
            assert s["tip"].startswith(s["bits"]) and s["bg"] not in ("", "rgba(0, 0, 0, 0)"), s
        n = api["usage"]["completion_tokens"]
        assert shown["stats"].startswith(f"{tier} \u00b7 {n} tokens \u00b7 "), shown["stats"]
        mean = sum(stats["avg_bits"]) / n
        assert f"mean width {mean:.2f} bits" in shown["stats"], (shown["stats"], mean)
        if widths is not None:
            assert served == widths, (tier, served)
            assert {s["bits"] for s in spans} == {f"{min(widths):.2f}"}
        else:  # balanced: the router picks widths per token, and the shading shows it
            assert len(served) > 1, served
            assert len({s["bits"] for s in spans}) > 1 and len({s["bg"] for s in spans}) > 1, spans
            last = d.find_elements(By.CSS_SELECTOR, ".turn:last-child .tok")[-1]
            ActionChains(d).move_to_element(last).perform()  # the tooltip a person sees on hover
            assert d.execute_script("return getComputedStyle(arguments[0], '::after').content", last) \
                == f'"{spans[-1]["tip"]}"'

    # "new chat" forgets the conversation: the first question gets the first answer again.
    first = history[1]["content"]
    d.find_element(By.ID, "reset").click()
    assert d.find_elements(By.CSS_SELECTOR, ".turn") == []
    assert ask(d, "Hello there", "min")["answer"] == first
    assert severe(d.get_log("browser")) == []


def screenshot(out: Path, port: int = 0) -> None:
    """The README's picture: the default model, one conversation at three tiers, a token's tooltip shown."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from server_fixture import free_port

    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "d2moe.cli", "serve", "--port", str(port), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    d = None
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"d2moe serve did not start: {log.read().decode()}")
            time.sleep(0.5)
        d = open_browser()
        d.get(base + "/")
        for tier, prompt in (("max", "Give me three tips for staying healthy."), ("balanced", "Why is the sky blue?"),
                             ("fast", "What is the capital of France?")):
            shown = ask(d, prompt, tier, timeout=600)
            print(f"[{tier}] {shown['stats']}\n{shown['answer']}", file=sys.stderr)
        toks = d.find_elements(By.CSS_SELECTOR, ".turn:last-child .tok")
        ActionChains(d).move_to_element(toks[min(5, len(toks) - 1)]).perform()
        time.sleep(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
        assert severe(d.get_log("browser")) == []
        try:  # 256 colours, no dithering: a third of the size, the same picture (Pillow comes with matplotlib)
            from PIL import Image

            Image.open(out).convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) \
                .save(out, optimize=True)
        except ImportError:
            pass
    finally:
        if d is not None:
            d.quit()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[-1])
    ap.add_argument("--screenshot", type=Path, required=True, help="PNG to write (e.g. docs/chat_page.png)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    if reason := _skip_reason():
        raise SystemExit(reason)
    screenshot(args.screenshot, args.port)
