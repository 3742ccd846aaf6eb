"""The site's lifetime ledger: never resets, refuses at the ceiling, survives restarts."""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedretrain.errors import LedgerError, PrivacyBudgetExceeded
from fedretrain.privacy.ledger import PrivacyLedger, ledger_lock

SITE = "site-a"
DELTA = 1e-5
# Three rounds a site might spend: (sigma, q, steps).
ROUNDS = [(1.1, 0.02, 30), (1.1, 0.02, 30), (0.9, 0.05, 20)]


def _opacus_epsilon(rounds: list[tuple[float, float, int]]) -> float:
    # A fresh opacus accountant that is told about every step the site ever took.
    accountant = RDPAccountant()
    for sigma, q, steps in rounds:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=DELTA)


def _ledger_with(rounds: list[tuple[float, float, int]]) -> PrivacyLedger:
    ledger = PrivacyLedger(site_id=SITE, accountant="rdp", delta=DELTA)
    for i, (sigma, q, steps) in enumerate(rounds):
        ledger.record("run-1", i, sigma, q, steps)
    return ledger


def _load(path: Path, **overrides: object) -> PrivacyLedger:
    settings: dict = {"site_id": SITE, "accountant": "rdp", "delta": DELTA, **overrides}
    return PrivacyLedger.load(path, **settings)


def test_epsilon_after_each_round_equals_opacus_over_the_whole_history() -> None:
    # Prepare
    ledger = PrivacyLedger(site_id=SITE, accountant="rdp", delta=DELTA)
    seen = []

    for k, (sigma, q, steps) in enumerate(ROUNDS, start=1):
        # Execute: one more round, as a fresh make_private would see it.
        ledger.record("run-1", k, sigma, q, steps)
        seen.append(ledger.epsilon())

        # Assert: the ledger composes rounds 1..k, it never restarts from zero.
        assert seen[-1] == pytest.approx(_opacus_epsilon(ROUNDS[:k]), rel=1e-9)
    assert seen[0] < seen[1] < seen[2]
    assert ledger.history == ROUNDS


def test_epsilon_after_predicts_the_next_round_without_recording_it() -> None:
    # Prepare
    ledger = _ledger_with(ROUNDS[:2])

    # Execute
    projected = ledger.epsilon_after(*ROUNDS[2])

    # Assert
    assert projected == pytest.approx(_opacus_epsilon(ROUNDS), rel=1e-9)
    assert len(ledger.entries) == 2


def test_refuses_the_round_that_would_pass_the_ceiling() -> None:
    # Prepare: a ceiling between the epsilon of two rounds and that of three.
    eps2, eps3 = _opacus_epsilon(ROUNDS[:2]), _opacus_epsilon(ROUNDS)
    ceiling = (eps2 + eps3) / 2
    ledger = _ledger_with(ROUNDS[:1])

    # Execute: the second round fits, the third does not.
    allowed = ledger.check_can_spend(*ROUNDS[1], ceiling=ceiling)
    ledger.record("run-1", 1, *ROUNDS[1])
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        ledger.check_can_spend(*ROUNDS[2], ceiling=ceiling)

    # Assert: the sentence names spent, projected and ceiling; nothing was recorded.
    assert allowed == pytest.approx(eps2, rel=1e-9)
    message = str(refused.value)
    for value in (eps2, eps3, ceiling):
        assert f"{value:.4f}" in message
    assert "spent" in message and "ceiling" in message
    assert len(ledger.entries) == 2


def test_a_round_landing_exactly_on_the_ceiling_is_allowed() -> None:
    # Prepare
    ledger = _ledger_with(ROUNDS[:2])
    ceiling = ledger.epsilon_after(*ROUNDS[2])

    # Execute / Assert: the ceiling is inclusive.
    assert ledger.check_can_spend(*ROUNDS[2], ceiling=ceiling) == ceiling


def test_survives_a_restart_of_the_site(tmp_path: Path) -> None:
    # Prepare: a site spends two rounds and goes down.
    path = tmp_path / "ledger.json"
    ledger = _ledger_with(ROUNDS[:2])
    ledger.save(path)
    ceiling = (_opacus_epsilon(ROUNDS[:2]) + _opacus_epsilon(ROUNDS)) / 2

    # Execute: a new process reads the file into a new object.
    restarted = _load(path)

    # Assert: same entries, same epsilon, and it still refuses the third round.
    assert restarted.entries == ledger.entries
    assert restarted.epsilon() == ledger.epsilon()
    with pytest.raises(PrivacyBudgetExceeded):
        restarted.check_can_spend(*ROUNDS[2], ceiling=ceiling)


def test_file_shows_epsilon_for_humans_but_load_recomputes_it(tmp_path: Path) -> None:
    # Prepare: someone edits the displayed epsilon down to 0.
    path = tmp_path / "ledger.json"
    _ledger_with(ROUNDS).save(path)
    data = json.loads(path.read_text())
    assert data["epsilon"] == pytest.approx(_opacus_epsilon(ROUNDS), rel=1e-9)
    data["epsilon"] = 0.0
    path.write_text(json.dumps(data))

    # Execute
    loaded = _load(path)

    # Assert
    assert loaded.epsilon() == pytest.approx(_opacus_epsilon(ROUNDS), rel=1e-9)


def test_missing_file_is_an_empty_ledger(tmp_path: Path) -> None:
    # Execute
    ledger = _load(tmp_path / "absent.json")

    # Assert
    assert ledger.entries == [] and ledger.epsilon() == 0.0


def test_corrupt_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Prepare: a write cut off half way (what atomic writes prevent).
    path = tmp_path / "ledger.json"
    _ledger_with(ROUNDS).save(path)
    path.write_text(path.read_text()[:40])

    # Execute / Assert
    with pytest.raises(LedgerError, match="ledger.json"):
        _load(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("delta", 1e-6), ("accountant", "prv"), ("site_id", "site-b")],
)
def test_ledger_of_other_settings_is_refused_naming_file_and_field(tmp_path: Path, field: str, value: object) -> None:
    # Prepare: a ledger written under other settings than this site now runs with.
    path = tmp_path / "ledger.json"
    _ledger_with(ROUNDS).save(path)

    # Execute / Assert
    with pytest.raises(LedgerError, match=rf"ledger\.json: field '{field}'"):
        _load(path, **{field: value})


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("entries"), "entries"),
        (lambda d: d["entries"][1].pop("steps"), "entries[1].steps"),
        (lambda d: d["entries"][0].update(steps=True), "entries[0].steps"),
        (lambda d: d["entries"][2].update(noise_multiplier=-1.0), "entries[2].noise_multiplier"),
        (lambda d: d["entries"][0].update(sample_rate="0.1"), "entries[0].sample_rate"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ],
    ids=["no entries", "no steps", "bool steps", "negative sigma", "text rate", "version"],
)
def test_wrong_schema_is_refused_naming_the_field(tmp_path: Path, mutate, field: str) -> None:
    # Prepare
    path = tmp_path / "ledger.json"
    _ledger_with(ROUNDS).save(path)
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))

    # Execute / Assert
    with pytest.raises(LedgerError, match=re.escape(f"ledger.json: field '{field}'")):
        _load(path)


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    # Execute: save twice (create, then replace).
    path = tmp_path / "ledger.json"
    _ledger_with(ROUNDS[:1]).save(path)
    _ledger_with(ROUNDS).save(path)

    # Assert
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a saved ledger, then one more round whose save dies at the rename.
    path = tmp_path / "ledger.json"
    ledger = _ledger_with(ROUNDS[:2])
    ledger.save(path)
    old = path.read_bytes()
    ledger.record("run-1", 2, *ROUNDS[2])

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)

    # Execute
    with pytest.raises(OSError, match="disk gone"):
        ledger.save(path)

    # Assert: readers still see the complete old ledger, and no debris is left.
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ledger.json"]
    assert _load(path).history == ROUNDS[:2]


def test_non_private_rounds_are_not_recorded() -> None:
    # Prepare
    ledger = PrivacyLedger(site_id=SITE, accountant="rdp", delta=DELTA)

    # Execute / Assert
    with pytest.raises(ValueError, match="non-private"):
        ledger.record("run-1", 0, 0.0, 0.1, 10)
    assert ledger.entries == []


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(ValueError, match="valid accountants"):
        PrivacyLedger(site_id=SITE, accountant="gdp", delta=DELTA)


def test_ledger_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    # Prepare: the lock file of a ledger in a state dir that does not exist yet.
    path = tmp_path / "state" / "ledger.json"
    lock = tmp_path / "state" / "ledger.json.lock"

    def try_lock() -> bool:
        # A second open file description, as another process would have.
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    # Execute / Assert: held inside the block, free after it.
    with ledger_lock(path):
        assert not try_lock()
    assert try_lock()
