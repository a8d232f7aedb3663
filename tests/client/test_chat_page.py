"""The gateway's chat page in a real browser: headless Chromium (driven by selenium through
chromedriver) loads it from `privlora gateway` on loopback, in front of a `privlora serve` that
hosts two tiny pads artifacts; every answer read from the page is compared with the one the
gateway's API gives for the same greedy request, and every figure beside it with the gateway's
log line for it. Screenshots go to $PRIVLORA_ARTIFACTS (default tests/artifacts, git-ignored)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from privlora.compiler.driver import compile_artifact
from privlora.tools.loadtest import ServerProcess
from support.gateway import GatewayProcess

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium and chromedriver on PATH (make test installs Debian's)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,900"]
SCREENSHOTS = Path(os.environ.get("PRIVLORA_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
TOKENS = 8
LONG = 200  # tokens asked for an answer to stop midway (the greedy answer to "hello" is 110 tokens)


@pytest.fixture(scope="module")
def stack(tiny_build, tmp_path_factory) -> Iterator[GatewayProcess]:
    """Two pads models, "clinic" (the tiny build's, by a link that gives it its name) and "legal"
    (another adapter), behind one server and the gateway."""
    from conftest import write_tiny_adapter

    root = tmp_path_factory.mktemp("chat-page")
    clinic = root / "clinic"
    clinic.symlink_to(tiny_build.artifact("pads"), target_is_directory=True)
    second = write_tiny_adapter(tiny_build.base, root / "adapter-b", ["q_proj", "o_proj"], seed=5)
    legal = compile_artifact(str(tiny_build.base), second, root / "legal", backend="pads").artifact
    server = ServerProcess([clinic, legal]).start()
    gateway = GatewayProcess([clinic, legal], server.url).start()
    yield gateway
    gateway.stop()
    server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, stack) -> webdriver.Chrome:
    """The chat page freshly loaded, its models listed."""
    browser.get(stack.url + "/")
    until(browser, "return document.body.dataset.ready === 'yes'")
    return browser


def until(driver: webdriver.Chrome, script: str, timeout: float = 60) -> Any:
    """Wait for a script's value to be truthy, and return it."""
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: d.execute_script(script))


def ask(driver: webdriver.Chrome, question: str, model: str = "clinic", max_tokens: int = TOKENS) -> float:
    """Pick the model, set max tokens, type the question and send it: when it was sent."""
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    settings = driver.find_element(By.ID, "max-tokens")
    driver.execute_script("document.getElementById('settings').open = true")
    settings.clear()
    settings.send_keys(str(max_tokens))
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    return time.perf_counter()


def messages(driver: webdriver.Chrome) -> list[tuple[str, str]]:
    """The conversation on the page: (role, text) per message."""
    return [tuple(m) for m in driver.execute_script(
        "return [...document.querySelectorAll('.message')].map(m => "
        "[m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.text').textContent])")]


def answered(driver: webdriver.Chrome, state: str = "done") -> str:
    """The last answer's text once it is in ``state``."""
    until(driver, f"const m = [...document.querySelectorAll('.message.assistant')].pop(); "
                  f"return m && m.dataset.state === '{state}' && document.body.dataset.busy === 'no'")
    return messages(driver)[-1][1]


def api_reply(stack: GatewayProcess, conversation: list[tuple[str, str]], model: str = "clinic",
              max_tokens: int = TOKENS) -> dict[str, Any]:
    """The gateway API's greedy reply to the same conversation."""
    body = {"model": model, "messages": [{"role": r, "content": t} for r, t in conversation],
            "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=60).json()


def api_answer(stack: GatewayProcess, conversation: list[tuple[str, str]], model: str = "clinic",
               max_tokens: int = TOKENS) -> str:
    """The greedy answer the gateway's API gives for the same conversation."""
    return api_reply(stack, conversation, model, max_tokens)["choices"][0]["message"]["content"]


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 0
    return path


def test_an_answer_streams_into_the_page_as_the_api_gives_it(page, stack, capsys):
    """Model picked, question sent: the streamed answer equals the API's greedy one, the figures
    beside it are the gateway's own (its log line), and nothing came from another origin."""
    assert Select(page.find_element(By.ID, "model")).options[1].get_attribute("value") == "legal"
    logged = len(stack.answers())
    sent = ask(page, "hello", model="legal")
    until(page, "return document.querySelector('.message.assistant .text')?.textContent")
    first_text_s = time.perf_counter() - sent
    answer = answered(page)
    assert answer == api_answer(stack, [("user", "hello")], model="legal")
    assert answer != api_answer(stack, [("user", "hello")], model="clinic")  # the picked model answered
    line = stack.wait_for_answers(logged + 1)[logged]
    shown = page.execute_script("return Object.fromEntries([...document.querySelectorAll('.stats span')]"
                                ".map(s => [s.dataset.stat, s.dataset.value]))")
    assert line["model"] == "legal" and int(line["completion_tokens"]) == TOKENS
    for stat, field in (("first token", "first_token_s"), ("online", "online_s"), ("offline", "offline_s")):
        assert float(shown[stat]) == pytest.approx(float(line[field]), abs=0.0006), stat
    assert float(shown["messages"]) >= TOKENS and float(shown["online data"]) > 0
    assert float(shown["offline data"]) > 0  # the first answer of a pads model: its pads were made for it
    api = api_reply(stack, [("user", "hello")], model="legal")["privlora"]["server_view"]  # same greedy tokens
    drawn = page.execute_script("return Object.fromEntries([...document.querySelectorAll('.view-row')]"
                                ".map(r => [r.dataset.view, r.querySelector('.strip').dataset.values]))")
    assert [float(v) for v in drawn["activation"].split(",")] == api["activation"]["strip"]  # the same x
    assert len(drawn["received"].split(",")) == 64 and drawn["received"] != ",".join(map(str, api["received"]["strip"]))
    assert "prefill" in page.execute_script("return document.querySelector('.message.assistant').dataset.phases")
    assert page.execute_script("return document.querySelector('.message.assistant .progress').hidden")
    origins = page.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) == {stack.url}
    path = screenshot(page, "chat-page.png")
    with capsys.disabled():
        print(f"\nchat page: first text {first_text_s:.2f} s after Send, whole answer of {TOKENS} tokens; "
              f"screenshot {path}")


def test_the_page_shows_the_pads_pool_filling_between_answers(page, stack):
    """After an answer used pads, the gateway makes more while the user types; the page's line
    follows the pool until it is warm again, and says so with the rows ready."""
    ask(page, "hello")
    answered(page)
    state = until(page, "const p = document.getElementById('pads'); "
                        "return !p.hidden && p.dataset.state === 'warm' && p.textContent")
    kept = {m["id"]: m["pads"]["kept"] for m in httpx.get(stack.url + "/v1/models").json()["data"]}["clinic"]
    shown = re.fullmatch(r"pads warm: (\d+) rows ready per group", state)
    assert shown and int(shown[1]) >= kept == 256


def test_a_second_turn_carries_the_first(page, stack):
    ask(page, "hello")
    first = answered(page)
    ask(page, "and then?")
    second = answered(page)
    conversation = [("user", "hello"), ("assistant", first), ("user", "and then?"), ("assistant", second)]
    assert messages(page) == conversation
    assert second == api_answer(stack, conversation[:3])


def test_stop_ends_the_answer_and_the_gateway_stops_generating(page, stack):
    logged = len(stack.answers())
    ask(page, "hello", max_tokens=LONG)
    until(page, "return document.querySelector('.message.assistant .text')?.textContent")
    page.find_element(By.ID, "stop").click()
    stopped = answered(page, "stopped")
    time.sleep(0.5)
    assert messages(page)[-1] == ("assistant", stopped)  # no more text came
    line = stack.wait_for_answers(logged + 1)[logged]
    assert line["finish"] == "cancelled" and int(line["completion_tokens"]) < 50, line  # whole: 110
    assert api_answer(stack, [("user", "hello")], max_tokens=LONG).startswith(stopped)
    page.find_element(By.ID, "new-chat").click()  # the page stays usable: a new chat answers in full
    assert messages(page) == []
    ask(page, "hello")
    assert answered(page) == api_answer(stack, [("user", "hello")])
    assert len(messages(page)) == 2


def test_an_overlong_prompt_shows_the_gateway_error_in_one_line(page, stack):
    question = "word " * 300
    refusal = httpx.post(stack.url + "/v1/chat/completions", timeout=60, json={
        "model": "clinic", "messages": [{"role": "user", "content": question}], "max_tokens": TOKENS})
    assert refusal.status_code == 413
    page.execute_script("document.getElementById('prompt').value = arguments[0]", question)
    ask(page, "", max_tokens=TOKENS)
    error = until(page, "const e = document.getElementById('error'); return !e.hidden && e")
    assert error.get_property("textContent") == refusal.json()["error"]["message"]
    line_height = float(page.execute_script("return parseFloat(getComputedStyle(arguments[0]).lineHeight)", error))
    assert error.size["height"] < 2 * line_height + 16  # one line (and its padding)
    assert messages(page) == [] and page.find_element(By.ID, "prompt").get_property("value") == question


def test_nothing_overflows_at_a_phone_width(browser, stack):
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.get(stack.url + "/")
        until(browser, "return document.body.dataset.ready === 'yes'")
        assert browser.execute_script("return window.innerWidth") == 390
        ask(browser, "x" * 120)  # one long word, and an answer
        answered(browser)
        overflowing = browser.execute_script(
            "const w = document.documentElement.clientWidth;"
            "return [document.documentElement.scrollWidth > w, ...[...document.querySelectorAll('body *')]"
            ".filter(e => e.getBoundingClientRect().right > w + 0.5).map(e => e.id || e.className || e.tagName)]")
        assert overflowing == [False]
        screenshot(browser, "chat-page-phone.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
