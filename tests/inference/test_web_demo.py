"""tools/web_demo.py in a real browser (issue: inference people use): Debian's headless Chromium, driven by selenium
through the system chromedriver, sends a message with the keyboard (Shift+Enter breaks the line, Enter sends), sees
the reply grow while it streams and then complete, pastes a document longer than max_position_embeddings, asks about
it with dynamic NTK and again with the switch off (the replies differ: the switch reached the model), types while a
reply streams (the text stays), stops one reply and clears another while they stream (they end), sees control
characters of a reply escaped and the length the model was trained on, and saves a screenshot. Every request the
page makes goes to the demo's own 127.0.0.1 server: nothing is fetched from the internet."""
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
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from testkit.chat_models import scripted_chat_folder, tiny_chat_folder
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
# What a model may send: ESC [2J clears a terminal, backspace and carriage return wipe text, BEL rings.
CONTROL_REPLY = "\x1b[2Jok\x08\r\x07 done"
SHOWN = r"\x1b[2Jok\x08\x0d\x07 done"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_demo(folder: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(REPO / "tools" / "web_demo.py"), "--model", str(folder),
                                   "--port", str(port), "--temperature", "0", *options],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
    return server, f"http://127.0.0.1:{port}/"


def wait_until_serving(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the web demo did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def demo_urls(tmp_path_factory):
    """Two demos, started together: a random tiny model (long replies that depend on the RoPE), and one whose reply
    is CONTROL_REPLY, from a folder that records the packed length it was trained on, as train_ds.py's exports do."""
    root = tmp_path_factory.mktemp("web")
    scripted = scripted_chat_folder(root / "scripted", CONTROL_REPLY)
    config = json.loads((scripted / "config.json").read_text())
    (scripted / "config.json").write_text(json.dumps({**config, "training_packed_length": 48}))
    logs = (root / "tiny.log", root / "scripted.log")
    servers = [start_demo(tiny_chat_folder(root / "hf"), logs[0], "--max_new_tokens", "120", "--max_context", "6000"),
               start_demo(scripted, logs[1], "--max_new_tokens", "20")]
    for (server, url), log in zip(servers, logs):
        wait_until_serving(server, url, log)
    yield [url for _, url in servers]
    for server, _ in servers:
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


def open_page(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))


def question_box(driver):
    return driver.find_element(By.CSS_SELECTOR, "#question textarea")


def bot_messages(driver) -> list[str]:
    return [message.text.strip() for message in driver.find_elements(By.CSS_SELECTOR, "#chatbot .message.bot")]


def user_messages(driver) -> list[str]:
    return [message.text.strip() for message in driver.find_elements(By.CSS_SELECTOR, "#chatbot .message.user")]


def reply_length(driver) -> int:
    messages = bot_messages(driver)
    return len(messages[-1]) if messages else 0


def status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def send(driver, *keys, document: str = "") -> tuple[str, str, list]:
    """Type `keys` into the question box (after pasting `document`) and press Enter, as a person does; wait for the
    reply to complete: (reply, status line, the lengths the reply had while it was written)."""
    replies_before = len(bot_messages(driver))
    driver.execute_script(WATCH_REPLIES)
    if document:
        box = driver.find_element(By.CSS_SELECTOR, "#document textarea")
        driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                              box, document)  # a paste: send_keys would type it key by key
    question_box(driver).send_keys(*keys, Keys.ENTER)
    WebDriverWait(driver, REPLY_TIMEOUT).until(
        lambda d: status(d).startswith("done") and len(bot_messages(d)) == replies_before + 1)
    lengths = [length for count, length in driver.execute_script("return window.replyLengths")
               if count == replies_before + 1]
    return bot_messages(driver)[-1], status(driver), lengths


def set_max_new_tokens(driver, value: int) -> None:
    """Through the slider's number box, in the Generation settings (opened the first time)."""
    selector = "#max_new_tokens input[type=number]"
    if not driver.find_elements(By.CSS_SELECTOR, selector):
        driver.find_element(By.CSS_SELECTOR, ".label-wrap").click()
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    number = driver.find_element(By.CSS_SELECTOR, selector)
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys(str(value), Keys.TAB)
    WebDriverWait(driver, 10).until(lambda d: d.find_element(
        By.CSS_SELECTOR, "#max_new_tokens input[type=range]").get_attribute("value") == str(value))


def clear(driver) -> None:
    """Press Clear and wait until the page shows an empty chat (the next send counts replies from there)."""
    driver.find_element(By.CSS_SELECTOR, "#clear").click()
    WebDriverWait(driver, REPLY_TIMEOUT).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, "#chatbot .message") and not status(d))


def test_chat_streams_and_the_ntk_switch_changes_the_next_reply(demo_urls, browser, tmp_path):
    open_page(browser, demo_urls[0])
    switch = browser.find_element(By.CSS_SELECTOR, "#dynamic_ntk input[type=checkbox]")
    assert switch.is_selected()  # the folder's rotary type: dynamic

    # Shift+Enter breaks the line, Enter sends (as the box's placeholder says)
    reply, status_line, lengths = send(browser, "Hello", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "there")
    assert user_messages(browser) == ["Hello\nthere"]
    assert question_box(browser).get_attribute("value") == ""
    grew = sorted(set(length for length in lengths if 0 < length < len(reply)))
    assert len(grew) >= 3, lengths  # seen while being written: it streamed
    assert reply and status_line.startswith("done with dynamic NTK RoPE")

    # a document past the model's 64 positions, asked about with each RoPE from the same (cleared) start
    document = (DATA / "pretrain_en" / "wiki_demo.txt").read_text(encoding="utf-8")[:600]
    clear(browser)
    dynamic_reply, dynamic_status, _ = send(browser, "What is this text about?", document=document)
    assert dynamic_status.startswith("done with dynamic NTK RoPE")
    assert "[document, " in user_messages(browser)[-1]
    context = browser.find_element(By.CSS_SELECTOR, "#context").text
    assert int(context.split("Context: ")[1].split(" tokens")[0]) > 64
    assert "the folder does not say what length the model was trained on" in context

    clear(browser)
    switch.click()
    assert not switch.is_selected()
    origin_reply, origin_status, _ = send(browser, "What is this text about?", document=document)
    assert origin_status.startswith("done with origin RoPE")
    assert origin_reply != dynamic_reply  # greedy, the same prompt: only the RoPE differs

    screenshot = tmp_path / "web_demo.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert requested_hosts(browser) == {"127.0.0.1"}


def wait_for_reply(driver, longer_than: int, what: str) -> None:
    """Until the reply being written is longer than `longer_than` characters; a timeout says where it stood."""
    try:
        WebDriverWait(driver, REPLY_TIMEOUT).until(lambda d: reply_length(d) > longer_than)
    except TimeoutException:
        pytest.fail(f"{what}: the reply has {reply_length(driver)} characters after {REPLY_TIMEOUT} s (waited for "
                    f"more than {longer_than}); status {status(driver)!r}")


def test_typing_while_a_reply_streams_stays_and_stop_and_clear_end_a_reply(demo_urls, browser):
    open_page(browser, demo_urls[0])
    set_max_new_tokens(browser, 5000)  # a reply that streams for a while
    question_box(browser).send_keys("Tell me a long story", Keys.ENTER)
    wait_for_reply(browser, 20, "the reply starts")
    document = browser.find_element(By.CSS_SELECTOR, "#document textarea")
    question_box(browser).send_keys("typed while it streams")
    document.send_keys("a document typed meanwhile")
    typed_at = reply_length(browser)
    wait_for_reply(browser, typed_at + 40, "tokens keep coming while the boxes are typed in")
    assert question_box(browser).get_attribute("value") == "typed while it streams"
    assert document.get_attribute("value") == "a document typed meanwhile"
    assert status(browser).startswith("generating")

    browser.find_element(By.CSS_SELECTOR, "#stop").click()
    WebDriverWait(browser, 30).until(lambda d: status(d).startswith("stopped"))
    stopped_at = reply_length(browser)
    time.sleep(3)
    assert reply_length(browser) == stopped_at and status(browser).startswith("stopped: this reply is not kept")

    # Enter sends what was typed; Clear, while that reply streams, ends it: the chat stays empty
    question_box(browser).send_keys(Keys.ENTER)
    WebDriverWait(browser, REPLY_TIMEOUT).until(lambda d: len(bot_messages(d)) == 2 and reply_length(d) > 20)
    assert user_messages(browser)[-1].startswith("[document, ")
    clear(browser)
    time.sleep(3)
    assert not browser.find_elements(By.CSS_SELECTOR, "#chatbot .message") and not status(browser)

    set_max_new_tokens(browser, 8)  # and the demo still answers
    reply, status_line, _ = send(browser, "Hello")
    assert reply and status_line.startswith("done with dynamic NTK RoPE: a ")


def test_control_characters_are_shown_escaped_and_the_trained_length_is_stated(demo_urls, browser):
    open_page(browser, demo_urls[1])
    reply, _, _ = send(browser, "Hello")
    assert reply == SHOWN
    context = browser.find_element(By.CSS_SELECTOR, "#context").text
    assert ("the model was trained on rows of 48 tokens (packed length); dynamic NTK RoPE rescales past 64 positions "
            "(max_position_embeddings)") in context
