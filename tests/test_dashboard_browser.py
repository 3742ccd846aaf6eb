"""The dashboard in a real headless browser (Debian's chromium), on a simulation as it runs.

The dashboard starts on an empty runs folder and a browser opens its Cycles page; then a
smoke simulation starts writing into that folder. Without a reload the run appears, and on
its page the round counter advances as the rounds land; once the run is written, the page
shows what summary.json and the registry say: each site's ε, the losses, the gate's
decision, the published version and the champion. Screenshots of the pages are saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import MISSING, browser_paths, chromium
from processes import first_line, start_cli

from fedretrain.registry.store import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# Four rounds of the smoke federation: the first takes seconds (Ray starts the sites), so the
# page is open before round 1 lands and sees each later one.
# (The robustness suite is tests/test_robustness_e2e.py's, and its table on the Cycle page tests/test_dashboard.py's.)
SIMULATION = [
    "experiment=smoke",
    "rounds=4",
    "model.max_length=64",
    "train.local_steps=8",
    "gate.site_tolerance=1",
    "gate.robustness.enabled=false",
    "simulation.client_cpus=2",  # one Ray actor: one import of torch and its kin, not two
]
POLL_S = 0.25


@pytest.fixture(scope="module")
def browser():
    if browser_paths() is None:
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    with chromium() as driver:
        yield driver


@pytest.fixture
def dashboard(tmp_path) -> Iterator[tuple[str, Path]]:
    runs = tmp_path / "runs"
    runs.mkdir()
    command = ["dashboard", "--runs", str(runs), "--port", "0", "--poll-seconds", str(POLL_S)]
    proc = start_cli(command)
    try:
        line = first_line(proc, timeout_s=120)
        assert line.startswith("fedretrain dashboard: http://127.0.0.1:"), line
        yield line.split()[2], runs
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def _wait(what: str, check, timeout_s: float = 240.0, *, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() not in (None, 0):
            pytest.fail(f"the simulation exited {proc.returncode} while waiting for {what} (its log is in tmp_path)")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _text(driver, element_id: str) -> str | None:
    # Read in one script: an element found, then read, may meanwhile have been swapped for a fresh one.
    script = "const e = document.getElementById(arguments[0]); return e && e.textContent"
    return driver.execute_script(script, element_id)


def _not_reloaded(driver) -> bool:
    return driver.execute_script("return window.fedretrainTestMark === true")


def test_a_running_cycle_updates_live_and_then_shows_its_files(browser, dashboard, tmp_path):
    url, runs = dashboard
    browser.get(url + "cycles")
    assert "none" in browser.find_element("id", "live").text
    browser.execute_script("window.fedretrainTestMark = true")  # gone if the page reloads
    log = tmp_path / "simulation.log"
    simulation = start_cli(["simulate", *SIMULATION, f"output_dir={runs}"], log=log)
    try:
        # The run appears in the index without a reload; its link leads to its page.
        script = "return Array.from(document.querySelectorAll('main table a'), a => a.textContent)"
        (run_id,) = _wait("the run in the index", lambda: browser.execute_script(script), proc=simulation)
        assert _not_reloaded(browser)
        browser.get(url + f"cycles/{run_id}")
        browser.execute_script("window.fedretrainTestMark = true")
        seen, exchanges = [], set()

        def finished() -> bool:
            exchanges.add(_text(browser, "exchange"))  # the exchange with the sites under way (live.json)
            shown = _text(browser, "round")
            if shown and shown.isdigit() and (not seen or seen[-1] != int(shown)):
                seen.append(int(shown))
            return _text(browser, "state") == "finished" and _text(browser, "gate-decision") is not None

        _wait("the finished cycle on its page", finished, proc=simulation)
        assert simulation.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if simulation.poll() is None:
            simulation.kill()
            simulation.wait()
    assert _not_reloaded(browser), "the page reloaded instead of updating in place"
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == 4, seen
    # The sites' first answers (the ready check, seconds while Ray starts them) showed as under way.
    assert any(e and e.startswith("now: ") and " replies in " in e for e in exchanges), exchanges
    assert _text(browser, "rounds") == "4"
    browser.save_screenshot(str(tmp_path / "cycle.png"))

    # The figures shown are summary.json's.
    summary = json.loads((runs / run_id / "summary.json").read_text())
    assert _text(browser, "baseline-loss") == f"{summary['baseline_loss']:.4f}"
    assert _text(browser, "candidate-loss") == f"{summary['candidate_loss']:.4f}"
    assert _text(browser, "gate-decision") == summary["gate"]["decision"]
    assert _text(browser, "published-version") == str(summary["published_version"])
    for site, figures in summary["sites"].items():
        assert _text(browser, f"epsilon-{site}") == f"{figures['epsilon']:.4f}", site

    # The registry's champion is the version this cycle published.
    browser.find_element("link text", "registry").click()
    registry = Registry(Path(summary["registry"]))
    head = registry.verified_champion(registry.public_key())  # the signed chain, checked
    assert head is not None and registry.champion() == head.version
    assert _text(browser, "champion") == str(head.version) == str(summary["published_version"])
    browser.save_screenshot(str(tmp_path / "versions.png"))

    browser.get(url + "federation")
    assert all(site in browser.find_element("id", "live").text for site in summary["sites"])
    browser.save_screenshot(str(tmp_path / "federation.png"))
    assert all((tmp_path / f"{page}.png").stat().st_size > 10_000 for page in ("cycle", "versions", "federation"))


def test_a_malformed_id_in_the_address_bar_is_refused(browser, dashboard):
    url, _ = dashboard
    said = {
        "cycles/a%20b": "malformed run id: 'a b'",
        "versions/x": "malformed registry id: 'x'",
        "cycles/..%2F..%2Fetc%2Fpasswd": "Not Found",  # the server decodes it to a path no route takes
        "cycles/no-such-run": "no run 'no-such-run'",
    }
    for path, message in said.items():
        browser.get(url + path)
        main = browser.find_element("id", "live").text
        assert message in main and "root:" not in main, (path, main)
