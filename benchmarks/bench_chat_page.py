"""A cold and a warm first answer, as a user of the chat page sees them: `privlora gateway` (its
in-process server) on a pads artifact, the page in headless Chromium. Cold: the question is sent
as soon as the page has loaded, while the gateway makes its first pads. Warm: a new chat, the
question sent once the page's line says the pads pool is warm. Time from Send to the first words
on the page, and the answer's own figures.

    python benchmarks/bench_chat_page.py ARTIFACT [SCREENSHOT.png]    # a pads artifact

With SCREENSHOT, the page after the warm answer is saved there (README's picture).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from privlora.tools.loadtest import free_port
from privlora.tools.machine import report_machine

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,900"]
QUESTION = "What are the weekday opening hours of Larkspur Valley Clinic?"
MAX_TOKENS = 24
PATIENCE = 900.0


def until(driver: webdriver.Chrome, script: str) -> object:
    return WebDriverWait(driver, PATIENCE, poll_frequency=0.02).until(lambda d: d.execute_script(script))


def first_answer(driver: webdriver.Chrome, question: str) -> dict[str, object]:
    """Send the question; the seconds to the first words and the answer's figures from the page."""
    driver.execute_script("document.getElementById('settings').open = true")
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    driver.find_element(By.ID, "prompt").send_keys(question)
    sent = time.perf_counter()
    driver.find_element(By.ID, "send").click()
    until(driver, "return document.querySelector('.message.assistant:last-child .text')?.textContent")
    words = time.perf_counter() - sent
    until(driver, "return document.body.dataset.busy === 'no'")
    shown = driver.execute_script("return Object.fromEntries([...document.querySelectorAll("
                                  "'.message.assistant:last-child .stats span')]"
                                  ".map(s => [s.dataset.stat, s.textContent.slice(s.dataset.stat.length + 1)]))")
    return {"first words": f"{words:.1f} s", **shown}


def main() -> None:
    report_machine()
    screenshot = sys.argv[2] if len(sys.argv) > 2 else None
    artifact = Path(tempfile.mkdtemp()) / "clinic"  # the model's name on the page: its directory's
    artifact.symlink_to(Path(sys.argv[1]).resolve(), target_is_directory=True)
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "privlora.cli", "gateway", str(artifact), "--port", str(port)],
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp()}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                httpx.get(url + "health").raise_for_status()
                break
            except httpx.HTTPError:
                assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
        driver.get(url)
        until(driver, "return document.body.dataset.ready === 'yes'")
        rows = {"cold (sent as the page loaded)": first_answer(driver, QUESTION)}
        driver.find_element(By.ID, "new-chat").click()
        waited = time.perf_counter()
        until(driver, "return document.getElementById('pads').dataset.state === 'warm'")
        print(f"pads pool warm {time.perf_counter() - waited:.1f} s after the first answer", flush=True)
        rows["warm (a new chat, pool warm)"] = first_answer(driver, QUESTION)
        if screenshot:
            driver.save_screenshot(screenshot)
    finally:
        driver.quit()
        gateway.terminate()
        gateway.wait()
    columns = list(next(iter(rows.values())))
    print("| first answer | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")


if __name__ == "__main__":
    main()
