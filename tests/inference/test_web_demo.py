"""tools/web_demo.py in a real browser (issue: inference people use): Debian's headless Chromium, driven by selenium
through the system chromedriver, sends a message, sees the reply grow while it streams and then complete, pastes a
document longer than max_position_embeddings, asks about it with dynamic NTK and again with the switch off (the
replies differ: the switch reached the model), and saves a screenshot. Every request the page makes goes to the
demo's own 127.0.0.1 server: nothing is fetched from the internet."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from testkit.chat_models import tiny_chat_folder
from testkit.paths import DATA, REPO

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # apt: chromium chromium-driver
START_TIMEOUT, REPLY_TIMEOUT = 180, 120  # a loaded 2-core machine
# The bot message being written, recorded at every change of the chat's DOM.
WATCH_REPLIES = """
window.replyLengths = [];
const chat = document.querySelector('#chatbot');
new MutationObserver(() => {
  const bots = chat.querySelectorAll('.message.bot');
  if (bots.length) window.replyLengths.push([bots.length, bots[bots.length - 1].innerText.trim().length]);
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    folder = tiny_chat_folder(tmp_path_factory.mktemp("web") / "hf")
    port = free_port()
    log = tmp_path_factory.mktemp("web_log") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "web_demo.py"), "--model", str(folder), "--port", str(port),
             "--temperature", "0", "--max_new_tokens", "120"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the web demo did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def requested_hosts(driver) -> set[str]:
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def send(driver, question: str, document: str = "") -> tuple[str, str, list]:
    """Type `question` (after pasting `document`), send it, wait for the reply to complete: (reply, status line,
    the lengths the reply had while it was written)."""
    replies_before = len(driver.find_elements(By.CSS_SELECTOR, "#chatbot .message.bot"))
    driver.execute_script(WATCH_REPLIES)
    if document:
        box = driver.find_element(By.CSS_SELECTOR, "#document textarea")
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                              box, document)  # a paste: send_keys would type it key by key
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#send").click()
    WebDriverWait(driver, REPLY_TIMEOUT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#status").text.startswith("done")
        and len(d.find_elements(By.CSS_SELECTOR, "#chatbot .message.bot")) == replies_before + 1)
    reply = driver.find_elements(By.CSS_SELECTOR, "#chatbot .message.bot")[-1].text.strip()
    lengths = [length for count, length in driver.execute_script("return window.replyLengths")
               if count == replies_before + 1]
    return reply, driver.find_element(By.CSS_SELECTOR, "#status").text, lengths


def clear(driver) -> None:
    """Press Clear and wait until the page shows an empty chat (the next send counts replies from there)."""
    driver.find_element(By.CSS_SELECTOR, "#clear").click()
    WebDriverWait(driver, REPLY_TIMEOUT).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "#chatbot .message")
        and not d.find_element(By.CSS_SELECTOR, "#status").text)


def test_chat_streams_and_the_ntk_switch_changes_the_next_reply(demo_url, browser, tmp_path):
    browser.get(demo_url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    switch = browser.find_element(By.CSS_SELECTOR, "#dynamic_ntk input[type=checkbox]")
    assert switch.is_selected()  # the folder's rotary type: dynamic

    reply, status, lengths = send(browser, "Hello there")
    grew = sorted(set(length for length in lengths if 0 < length < len(reply)))
    assert len(grew) >= 3, lengths  # seen while being written: it streamed
    assert reply and status.startswith("done with dynamic NTK RoPE")

    # a document past the model's 64 positions, asked about with each RoPE from the same (cleared) start
    document = (DATA / "pretrain_en" / "wiki_demo.txt").read_text(encoding="utf-8")[:600]
    clear(browser)
    dynamic_reply, dynamic_status, _ = send(browser, "What is this text about?", document)
    assert dynamic_status.startswith("done with dynamic NTK RoPE")
    assert "[document, " in browser.find_elements(By.CSS_SELECTOR, "#chatbot .message.user")[-1].text
    context = browser.find_element(By.CSS_SELECTOR, "#context").text
    assert int(context.split("Context: ")[1].split(" tokens")[0]) > 64

    clear(browser)
    switch.click()
    assert not switch.is_selected()
    origin_reply, origin_status, _ = send(browser, "What is this text about?", document)
    assert origin_status.startswith("done with origin RoPE")
    assert origin_reply != dynamic_reply  # greedy, the same prompt: only the RoPE differs

    screenshot = tmp_path / "web_demo.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert requested_hosts(browser) == {"127.0.0.1"}
