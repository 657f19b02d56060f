"""desto's dashboard in a real browser: Debian's chromium driven by Playwright, run inside the
dashboard container's network namespace (where desto listens on 127.0.0.1:8809).

A test tool's own browser download is never used: the system's chromium is, and the tier is
skipped with the reason where there is none."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DASHBOARD_URL = "http://127.0.0.1:8809/"


def chromium_unavailable() -> str | None:
    """Why no browser test can run here, in one line; None when one can."""
    if shutil.which("nsenter") is None:
        return "nsenter is missing (util-linux)"
    if os.geteuid() != 0:
        return "entering the dashboard container's network namespace (nsenter) needs root"
    if chromium() is None:
        return "no system chromium (Debian: apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (the test extra has it: pip install -e '.[test]')"
    return None


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class HistoryTab:
    """desto's Session History tab, open in a page. Each archived session is a card with its name,
    a status badge and its buttons (info, restart, delete)."""

    page: Any  # playwright.sync_api.Page

    def cards(self) -> Any:
        """The session cards (inside the tab's own card, which holds them all)."""
        cards = self.page.locator(".q-tab-panel .q-card")
        return cards.filter(has=self.page.locator(".q-badge")).filter(has_not=self.page.locator(".q-card"))

    def card(self, session_name: str) -> Any:
        return self.cards().filter(has=self.page.get_by_text(session_name, exact=True))

    def sessions(self) -> dict[str, str]:
        """Session name -> the status its badge shows, for every card on the tab."""
        shown = {}
        for card in self.cards().all():
            name = card.locator(".text-base").first.inner_text().strip()
            shown[name] = card.locator(".q-badge").first.inner_text().strip().lower()
        return shown

    def stat(self, label: str) -> int:
        """A figure of the stats row (Total, Finished, Failed, Running)."""
        chip = self.page.locator(".q-tab-panel .rounded-lg").filter(has=self.page.get_by_text(label, exact=True))
        return int(chip.first.locator(".text-xl").inner_text())

    def delete_button(self, session_name: str) -> Any:
        """The card's delete button (it opens desto's confirmation dialog)."""
        return self.card(session_name).locator("button").filter(has=self._icon("delete"))

    def delete(self, session_name: str) -> None:
        """Delete a session as a person does: its trash button, then desto's dialog's Delete."""
        self.delete_button(session_name).click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(f"Delete '{session_name}' from history?").wait_for(timeout=10_000)
        dialog.get_by_role("button", name=re.compile(r"^Delete$")).click()
        dialog.wait_for(state="hidden", timeout=10_000)

    def clear_history(self) -> None:
        """The tab's Clear History button, then desto's dialog's Clear All History."""
        panel = self.page.locator(".q-tab-panel").filter(has=self.page.get_by_text("Session History", exact=True))
        panel.get_by_role("button", name=re.compile(r"Clear History$")).click()  # not the Sessions tab's own
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_role("button", name=re.compile(r"Clear All History$")).click()
        dialog.wait_for(state="hidden", timeout=10_000)

    def refresh(self) -> None:
        self.page.locator(".q-tab-panel button").filter(has=self._icon("refresh")).first.click()

    def _icon(self, name: str) -> Any:
        """A Material icon, by its exact name (``delete`` is not ``delete_sweep``)."""
        return self.page.locator("i.q-icon", has_text=re.compile(f"^{re.escape(name)}$"))

    def screenshot(self, path: Path, whole_page: bool = False) -> Path:
        """The tab's panel (or the whole page) as a PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if whole_page:
            self.page.screenshot(path=str(path), full_page=True)
        else:
            panel = self.page.locator(".q-tab-panel .q-card").filter(has=self.page.get_by_text("Session History"))
            panel.first.screenshot(path=str(path))
        return path


@contextmanager
def history_tab(netns: list[str], workdir: Path, url: str = DASHBOARD_URL) -> Iterator[HistoryTab]:
    """The dashboard opened on its Session History tab, in chromium running inside ``netns`` (the
    prefix from container_helpers.in_netns). Requests that would leave the machine (desto's page
    imports a web font) are refused, so nothing waits on a network the container does not have."""
    from playwright.sync_api import sync_playwright

    browser_path = chromium()
    assert browser_path is not None
    wrapper = workdir / "chromium-in-netns"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(netns) + f' {browser_path} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(wrapper), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), lambda route: route.abort())
            page.goto(url, wait_until="domcontentloaded", timeout=30_000)
            page.get_by_role("tab", name=re.compile("Session History")).click()
            page.locator(".q-tab-panel").get_by_text("Session History", exact=True).wait_for(timeout=15_000)
            yield HistoryTab(page)
        finally:
            browser.close()
