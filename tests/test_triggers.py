"""The retraining triggers on hand-made site statuses: each trigger fires at its threshold and
not below, null turns it off, and the holds (running cycle, rate limit, too few sites) apply."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from fedretrain.config.schema import TriggerConfig
from fedretrain.errors import ReplyRejected
from server.watch.triggers import TRIGGERS, SiteStatus, evaluate_triggers, format_decision

# Every trigger off; each test turns on the one it checks.
OFF = TriggerConfig(new_records=None, drift_js=None, drift_hidden=None, performance_margin=None, schedule_s=None)
# A published model and a cycle at t=0: "initial" stays quiet.
AFTER_FIRST = {"now": 1000.0, "last_cycle_at": 0.0, "champion_version": 1}


def metrics(**overrides) -> dict:
    """A well-formed status reply; keyword ``new_records=5`` sets ``new-records``, None removes a key."""
    base = {
        "new-records": 10,
        "reference-records": 100,
        "has-reference": 1,
        "train-records": 200,
        "model-version": 1,
        "epsilon-spent": 2.0,
        "epsilon-ceiling": 8.0,
        "delta": 1e-5,
        "epsilon-projected": 3.0,
        "can-afford": 1,
    }
    for name, value in overrides.items():
        key = name.replace("_", "-")
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def status(site_id: str, **overrides) -> SiteStatus:
    return SiteStatus.from_metrics(site_id, hash(site_id) % 1000, metrics(**overrides))


def fired(decision) -> list[str]:
    return [a.trigger for a in decision.alerts]


# --- initial --------------------------------------------------------------------------------------


def test_initial_fires_when_nothing_is_published_and_no_cycle_ran():
    decision = evaluate_triggers(OFF, [status("a")], now=0.0, last_cycle_at=None, champion_version=None)

    assert fired(decision) == ["initial"] and decision.start
    assert decision.eligible == ("a",) and decision.held is None


@pytest.mark.parametrize("last_cycle_at, champion", [(None, 1), (0.0, None), (0.0, 1)])
def test_initial_is_quiet_once_a_model_is_published_or_a_cycle_ran(last_cycle_at, champion):
    decision = evaluate_triggers(OFF, [status("a")], now=10.0, last_cycle_at=last_cycle_at, champion_version=champion)

    assert fired(decision) == [] and not decision.start


# --- new_records ----------------------------------------------------------------------------------


def test_new_records_fires_at_the_threshold_summed_over_sites():
    cfg = replace(OFF, new_records=1000)
    sites = [status("a", new_records=600), status("b", new_records=400)]

    decision = evaluate_triggers(cfg, sites, **AFTER_FIRST)

    assert fired(decision) == ["new_records"] and decision.start
    figures = decision.alerts[0].figures
    assert figures["total"] == 1000 and figures["sites"] == {"a": 600, "b": 400}
    assert decision.alerts[0].message == "1000 new records at 2 site(s), threshold 1000"


def test_new_records_is_quiet_one_record_below_the_threshold():
    sites = [status("a", new_records=600), status("b", new_records=400)]

    decision = evaluate_triggers(replace(OFF, new_records=1001), sites, **AFTER_FIRST)

    assert fired(decision) == [] and not decision.start


def test_new_records_null_is_off():
    decision = evaluate_triggers(OFF, [status("a", new_records=10**9)], **AFTER_FIRST)

    assert fired(decision) == []


# --- drift ----------------------------------------------------------------------------------------


def test_drift_fires_at_the_js_threshold_and_lists_the_sites():
    sites = [status("a", drift_js=0.05), status("b", drift_js=0.049), status("c")]  # c sent no score

    decision = evaluate_triggers(replace(OFF, drift_js=0.05), sites, **AFTER_FIRST)

    assert fired(decision) == ["drift"] and decision.start
    assert decision.alerts[0].figures["sites"] == {"a": {"drift_js": 0.05}}
    assert "a: js 0.0500 >= 0.0500" in decision.alerts[0].message


def test_drift_is_quiet_just_below_the_threshold():
    decision = evaluate_triggers(replace(OFF, drift_js=0.05), [status("a", drift_js=0.0499)], **AFTER_FIRST)

    assert fired(decision) == []


def test_drift_on_hidden_shift_alone_counts_and_js_null_ignores_js():
    cfg = replace(OFF, drift_hidden=2.0)
    sites = [status("a", drift_js=0.9, drift_hidden=1.0), status("b", drift_js=0.0, drift_hidden=2.5)]

    decision = evaluate_triggers(cfg, sites, **AFTER_FIRST)

    assert decision.alerts[0].figures["sites"] == {"b": {"drift_hidden": 2.5}}


def test_drift_needs_drift_min_sites():
    cfg = replace(OFF, drift_js=0.05, drift_min_sites=2)
    one = [status("a", drift_js=0.2), status("b", drift_js=0.01)]
    two = [status("a", drift_js=0.2), status("b", drift_js=0.06)]

    quiet = evaluate_triggers(cfg, one, **AFTER_FIRST)
    loud = evaluate_triggers(cfg, two, **AFTER_FIRST)

    assert fired(quiet) == []
    assert fired(loud) == ["drift"]
    assert loud.alerts[0].figures["count"] == 2
    assert loud.alerts[0].figures["sites"] == {"a": {"drift_js": 0.2}, "b": {"drift_js": 0.06}}


def test_drift_with_both_thresholds_null_is_off():
    decision = evaluate_triggers(OFF, [status("a", drift_js=1.0, drift_hidden=99.0)], **AFTER_FIRST)

    assert fired(decision) == []


# --- performance ----------------------------------------------------------------------------------


def perf_sites(new_a: int = 30, new_b: int = 10) -> list[SiteStatus]:
    # a: loss rises by 0.5 on new data; b: falls by 0.25; c sent no losses and does not count.
    # (Binary fractions, so the gaps below are exact and "at the margin" means exactly at it.)
    return [
        status("a", new_records=new_a, loss_new=2.5, loss_reference=2.0),
        status("b", new_records=new_b, loss_new=1.75, loss_reference=2.0),
        status("c", new_records=1000),
    ]


def test_performance_fires_above_the_margin_weighted_by_new_records():
    # (30 * 0.5 + 10 * -0.25) / 40 = 12.5 / 40 = 0.3125
    decision = evaluate_triggers(replace(OFF, performance_margin=0.3124), perf_sites(), **AFTER_FIRST)

    assert fired(decision) == ["performance"]
    assert decision.alerts[0].figures["gap"] == 0.3125
    assert decision.alerts[0].figures["sites"] == {"a": 0.5, "b": -0.25}


def test_performance_is_quiet_at_the_margin():
    # The gap must exceed the margin: 0.3125 against 0.3125 does not.
    quiet_at = evaluate_triggers(replace(OFF, performance_margin=0.3125), perf_sites(), **AFTER_FIRST)

    assert fired(quiet_at) == []


def test_performance_weighs_sites_equally_when_no_new_records_are_counted():
    # (0.5 + -0.25) / 2 = 0.125, where weights 30 and 10 would give 0.3125
    loud = evaluate_triggers(replace(OFF, performance_margin=0.12), perf_sites(0, 0)[:2], **AFTER_FIRST)
    quiet = evaluate_triggers(replace(OFF, performance_margin=0.13), perf_sites(0, 0)[:2], **AFTER_FIRST)

    assert loud.alerts[0].figures["gap"] == 0.125
    assert fired(quiet) == []


def test_performance_null_or_no_scores_is_off():
    off = evaluate_triggers(OFF, perf_sites(), **AFTER_FIRST)
    unscored = evaluate_triggers(replace(OFF, performance_margin=0.01), [status("c")], **AFTER_FIRST)

    assert fired(off) == [] and fired(unscored) == []


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_fires_when_the_period_has_passed():
    cfg = replace(OFF, schedule_s=3600.0)

    at = evaluate_triggers(cfg, [status("a")], now=4600.0, last_cycle_at=1000.0, champion_version=1)
    below = evaluate_triggers(cfg, [status("a")], now=4599.0, last_cycle_at=1000.0, champion_version=1)
    never = evaluate_triggers(cfg, [status("a")], now=5.0, last_cycle_at=None, champion_version=1)

    assert fired(at) == ["schedule"] and at.alerts[0].figures["elapsed_s"] == 3600.0
    assert fired(below) == []
    assert fired(never) == ["schedule"]


def test_schedule_null_is_off():
    decision = evaluate_triggers(OFF, [status("a")], now=1e9, last_cycle_at=0.0, champion_version=1)

    assert fired(decision) == []


# --- operator, combinations, exclusions -----------------------------------------------------------


def test_each_operator_request_is_one_alert_with_its_reason():
    decision = evaluate_triggers(OFF, [status("a")], operator_requests=["new guideline", "audit"], **AFTER_FIRST)

    assert fired(decision) == ["operator", "operator"] and decision.start
    assert [a.figures["reason"] for a in decision.alerts] == ["new guideline", "audit"]


def test_two_triggers_at_once_start_one_cycle_with_both_alerts():
    cfg = replace(OFF, new_records=100, drift_js=0.05)
    sites = [status("a", new_records=80, drift_js=0.1), status("b", new_records=20)]

    decision = evaluate_triggers(cfg, sites, **AFTER_FIRST)

    assert decision.start and decision.held is None
    assert fired(decision) == ["new_records", "drift"]
    assert decision.eligible == ("a", "b")


def test_a_site_out_of_budget_is_excluded_with_its_figures():
    cfg = replace(OFF, new_records=10)
    poor = status("b", epsilon_spent=7.62, epsilon_projected=9.1, epsilon_ceiling=8.0, can_afford=0)

    decision = evaluate_triggers(cfg, [status("a"), poor], **AFTER_FIRST)

    assert decision.start and decision.eligible == ("a",)
    assert decision.excluded == {"b": "epsilon 7.62 spent, 9.10 after another cycle, ceiling 8.00"}
    # Its new records still count towards the trigger: 10 + 10 >= 10.
    assert decision.alerts[0].figures["total"] == 20


# --- holds ----------------------------------------------------------------------------------------


def test_rate_limit_holds_a_trigger_and_lifts_at_the_interval():
    cfg = replace(OFF, new_records=1, min_interval_s=3600.0)

    held = evaluate_triggers(cfg, [status("a")], now=1800.0, last_cycle_at=0.0, champion_version=1)
    free = evaluate_triggers(cfg, [status("a")], now=3600.0, last_cycle_at=0.0, champion_version=1)

    assert fired(held) == ["new_records"] and not held.start
    assert held.held == "rate limit: 1800 s since the last cycle, minimum 3600 s"
    assert free.start and free.held is None


def test_an_operator_request_bypasses_the_rate_limit():
    cfg = replace(OFF, new_records=1, min_interval_s=3600.0)

    decision = evaluate_triggers(
        cfg, [status("a")], now=1800.0, last_cycle_at=0.0, champion_version=1, operator_requests=["urgent fix"]
    )

    assert decision.start and decision.held is None
    assert fired(decision) == ["new_records", "operator"]


def test_a_running_cycle_holds_everything_even_an_operator():
    decision = evaluate_triggers(
        OFF,
        [status("a")],
        now=0.0,
        last_cycle_at=None,
        champion_version=None,
        operator_requests=["now"],
        cycle_running=True,
    )

    assert fired(decision) == ["initial", "operator"] and not decision.start
    assert decision.held == "a cycle is already running"


def test_too_few_eligible_sites_hold_the_cycle():
    sites = [status("a"), status("b", can_afford=0)]

    decision = evaluate_triggers(OFF, sites, operator_requests=["go"], min_sites=2, **AFTER_FIRST)

    assert not decision.start
    assert decision.held == "only 1 sites can pay for another cycle; min_sites is 2"
    assert "b" in decision.excluded


def test_no_alert_means_no_start_and_nothing_held():
    decision = evaluate_triggers(OFF, [], **AFTER_FIRST)

    assert not decision.start and decision.alerts == () and decision.held is None


def test_duplicate_site_ids_are_refused():
    with pytest.raises(ValueError, match=r"\['a'\] answered more than once"):
        evaluate_triggers(OFF, [status("a"), status("a")], **AFTER_FIRST)


def test_the_registry_names_every_trigger_in_order():
    assert list(TRIGGERS) == ["initial", "new_records", "drift", "performance", "schedule", "operator"]


# --- outputs --------------------------------------------------------------------------------------


def test_to_dict_is_json_and_format_names_alerts_and_exclusions():
    cfg = replace(OFF, drift_js=0.05, min_interval_s=100.0)
    sites = [status("a", drift_js=0.1), status("b", can_afford=0)]
    decision = evaluate_triggers(cfg, sites, now=50.0, last_cycle_at=0.0, champion_version=1)

    data = json.loads(json.dumps(decision.to_dict()))
    text = format_decision(decision)

    assert data["start"] is False and data["alerts"][0]["trigger"] == "drift"
    assert data["excluded"] == {"b": "epsilon 2.00 spent, 3.00 after another cycle, ceiling 8.00"}
    assert text.splitlines()[0] == "retraining held (drift): rate limit: 50 s since the last cycle, minimum 100 s"
    assert "  site b excluded: epsilon 2.00 spent" in text


# --- from_metrics ---------------------------------------------------------------------------------


def test_from_metrics_converts_types_and_leaves_missing_scores_none():
    site = SiteStatus.from_metrics("a", 7, metrics(new_records=12.0, drift_js=0.02))

    assert site.new_records == 12 and isinstance(site.new_records, int)
    assert site.has_reference is True and site.can_afford is True
    assert site.drift_js == 0.02 and site.drift_hidden is None and site.loss_new is None
    assert site.node_id == 7 and site.epsilon_ceiling == 8.0


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        ({"can_afford": None}, "can-afford", "missing"),
        ({"epsilon_spent": "2.0"}, "epsilon-spent", "finite number"),
        ({"delta": math.nan}, "delta", "finite number"),
        ({"drift_js": math.inf}, "drift-js", "finite number"),
        ({"loss_new": [1.0, 2.0]}, "loss-new", "finite number"),
        ({"new_records": -3}, "new-records", "whole number >= 0"),
        ({"train_records": 2.5}, "train-records", "whole number >= 0"),
        ({"has_reference": 2}, "has-reference", "0 or 1"),
        ({"epsilon_projected": -0.1}, "epsilon-projected", ">= 0"),
    ],
)
def test_from_metrics_refuses_malformed_metrics_naming_the_key(overrides, key, words):
    with pytest.raises(ValueError) as caught:
        SiteStatus.from_metrics("a", 7, metrics(**overrides))

    assert isinstance(caught.value, ReplyRejected)
    assert f"site a: status key '{key}'" in str(caught.value) and words in str(caught.value)
