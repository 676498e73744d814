"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) opens
/dashboard on a live server under load and sees what a person would see: the requests it
sent running in the batch view, their shared prefix in the tree (shown as text, markup and
all), and, once the load is over, the block grid's counts equal to /metrics."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.metrics_scrape import scrape, wait_idle
from tests.server_process import ServerProcess

CHROMIUM = shutil.which("chromium")
# Root in a container has no sandbox to drop into; the rest keeps Chromium off the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PREFIX = "A <b>bold</b> story: once upon a time a little fox lived in the woods. " * 2
BLOCKS = 160
SCREENSHOT_DIR = os.environ.get("STRATA_SCREENSHOT_DIR")  # keeps the screenshot, for docs/

# `make test` installs it; in CI a missing one fails the test (Playwright finds no browser).
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="chromium is not installed (make browser)")


class Load:
    """Streams with the shared prefix, one after another on each thread, until stopped;
    the completion ids the server gave them."""

    def __init__(self, url: str, threads: int) -> None:
        self.url, self.stopped, self.ids = url, threading.Event(), set()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            number = 0
            while not self.stopped.is_set():
                number += 1
                body = {"prompt": f"{PREFIX}Tale {index}.{number}:",
                        "max_tokens": 40 + 60 * ((index + number) % 3), "ignore_eos": True,
                        "stream": True}
                with client.stream("POST", f"{self.url}/v1/completions", json=body) as stream:
                    if stream.status_code != 200:
                        self.errors.append(stream.read().decode())
                        continue
                    for line in stream.iter_lines():
                        if line.startswith("data: {"):
                            self.ids.add(orjson.loads(line[6:])["id"])
                        if self.stopped.is_set():
                            break  # leaving aborts it

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Three run at once and the others wait; finished ones' blocks stay cached until the
    # pool needs them.
    server = ServerProcess(tmp_path_factory.mktemp("dashboard"), "--num-gpu-blocks-override",
                           str(BLOCKS), "--max-num-seqs", "3")
    yield server
    assert server.stop() == 0, server.log_text()


def counts(page) -> dict[str, int]:
    return {name: int(page.locator(f"#kv-{name}").inner_text())
            for name in ("free", "cached", "held", "shared")}


def wait_for_one_of_ours(page, load: Load, timeout: float = 20.0) -> None:
    """Until a running row is a request the load sent (its id: the completion's, and the
    sample's index): the stream may not have had its first chunk when the page drew it."""
    deadline = time.monotonic() + timeout
    while True:
        for row in page.locator("#running tbody tr").all():
            shown = row.get_attribute("data-request-id") or ""
            if any(shown.startswith(f"{i}-") for i in load.ids):
                assert "running" in row.inner_text()
                return
        assert time.monotonic() < deadline, f"none of {len(load.ids)} requests shown"
        page.wait_for_timeout(50)


def wait_for_a_snapshot_after(page, since: float, timeout: float = 10.0) -> None:
    """Until the page draws a snapshot taken after `since` (read as an attribute: the page's
    policy allows no script of Playwright's own)."""
    deadline = time.monotonic() + timeout
    while float(page.locator("body").get_attribute("data-snapshot-time") or 0) <= since:
        assert time.monotonic() < deadline, "the page drew no new snapshot"
        page.wait_for_timeout(50)


def test_a_person_sees_the_batch_the_tree_and_the_pool(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    load = Load(server.url, threads=5)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(f"{server.url}/dashboard")
                expect(page.locator("#status")).to_have_text("live", timeout=20_000)
                # The batch view: the requests this test sent, running.
                rows = page.locator("#running tbody tr")
                expect(rows.first).to_be_visible(timeout=20_000)
                wait_for_one_of_ours(page, load)
                held = counts(page)
                assert held["held"] + held["shared"] > 0
                # The tree: their shared prefix, reused, shown as the text it is.
                node = page.locator("#tree .node", has_text="A <b>bold</b> story").first
                expect(node).to_be_visible(timeout=20_000)
                page.wait_for_timeout(500)
                assert int(node.get_attribute("data-hits")) >= 2
                assert page.locator("#tree b").count() == 0  # markup in a prompt stays text
                if SCREENSHOT_DIR:  # a few seconds of history in the sparklines
                    page.wait_for_timeout(3000)
                rows.first.hover()  # its blocks outlined in the grid
                page.wait_for_timeout(300)
                page.screenshot(path=tmp_path / "dashboard.png")
                if SCREENSHOT_DIR:
                    shutil.copy(tmp_path / "dashboard.png", Path(SCREENSHOT_DIR))
                load.stop()
                assert not load.errors, load.errors
                # Idle: the grid's counts are /metrics', once the page shows a later snapshot.
                idle = wait_idle(server.url)
                wait_for_a_snapshot_after(page, time.time())
                grid = counts(page)
                assert sum(grid.values()) == BLOCKS
                assert grid["held"] + grid["shared"] == round(
                    idle["vllm:kv_cache_usage_perc"] * BLOCKS) == 0
                assert grid["cached"] == idle["strata:kv_cache_cached_blocks"] > 0
                assert page.locator("#running tbody tr").count() == 0
                assert scrape(server.url)["strata:kv_cache_cached_blocks"] == grid["cached"]
            finally:
                browser.close()
    finally:
        load.stop()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
