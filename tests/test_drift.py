"""Drift scores (fedretrain/monitoring/drift.py) and the simulation's drifted arrivals (simulation/drift.py).

Pure functions against values worked out by hand; then the scores on simulated notes:
near 0 for two samples of one site's distribution, clearly higher after the injected drift.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from client.round.site import site_model
from fedretrain.config import Job, compose_config
from fedretrain.data.encoding import encode_texts
from fedretrain.modeling.lora_model import adapter_arrays, load_adapter_arrays
from fedretrain.monitoring.drift import hidden_state_shift, mean_hidden_states, token_js_divergence
from simulation.drift import (
    DRIFT_HEADERS,
    drifted_mix,
    fresh_probe,
    rewrite_terminology,
    step_arrivals,
)
from simulation.notes import site_notes, specialty_mix_for_site
from simulation.specialties import SPECIALTIES
from simulation.styles import HEADER_SETS, site_style

MIX = specialty_mix_for_site(0, dirichlet_alpha=0.5, seed=0)


# --- token_js_divergence ----------------------------------------------------------------


def test_identical_token_frequencies_score_zero():
    # Same frequencies, different records and order: JSD 0, and the bias term is clipped away.
    assert token_js_divergence([[1, 2, 2, 3]], [[3, 2], [1, 2]], vocab_size=5) == 0.0


def test_disjoint_supports_score_one_bit():
    assert token_js_divergence([[0, 1, 0, 1]], [[2, 3], [3, 2]], vocab_size=4) == 1.0


def test_partial_overlap_by_hand():
    # P = (1, 0), Q = (1/2, 1/2): M = (3/4, 1/4), H(M) = 0.811278, H(P) = 0, H(Q) = 1:
    # JSD = 0.811278 - 1/2. Bias term: K_P = 1, K_Q = K_M = 2, N = 4:
    # 0 + 1/16 - 1 * (1/4 + 1/4) / 8 = 0 nats.
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5
    assert token_js_divergence([[0, 0, 0, 0]], [[0, 1, 0, 1]], vocab_size=2) == pytest.approx(expected, abs=1e-9)


def test_the_small_sample_correction_by_hand():
    # P = (1/2, 1/2, 0, 0) from 2 tokens, Q uniform on 4 from 4 tokens: plug-in JSD is
    # H(3/8, 3/8, 1/8, 1/8) - (1 + 2) / 2. Bias: 1/(4*2) + 3/(4*4) - 3 * (1/2 + 1/4) / 8 = 1/32 nats.
    h_m = -2 * (0.375 * math.log2(0.375) + 0.125 * math.log2(0.125))
    expected = h_m - 1.5 - 1 / (32 * math.log(2))
    assert token_js_divergence([[0, 1]], [[0, 1, 2, 3]], vocab_size=4) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("reference, new", [([[]], [[1]]), ([[1]], [[4]]), ([[-1]], [[1]])])
def test_empty_samples_and_foreign_ids_are_refused(reference, new):
    with pytest.raises(ValueError):
        token_js_divergence(reference, new, vocab_size=4)


# --- hidden_state_shift -----------------------------------------------------------------


def test_hidden_shift_by_hand():
    # Reference: the corners of a 2x2 square, mean (1, 1), per-dimension variance 4/3, tr S = 8/3.
    # New: two copies of (4, 1): |mu_new - mu_ref|^2 = 9, tr S_new = 0.
    # excess = 9 - (8/3) / 4 - 0 = 25/3; shift = sqrt((25/3) / (8/3)) = sqrt(25/8).
    reference = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=float)
    new = np.array([[4, 1], [4, 1]], dtype=float)
    assert hidden_state_shift(reference, new) == pytest.approx(math.sqrt(25 / 8))


def test_hidden_shift_of_a_sample_against_itself_is_zero():
    reference = np.random.default_rng(0).normal(size=(50, 8))
    assert hidden_state_shift(reference, reference) == 0.0


def test_hidden_shift_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        hidden_state_shift(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        hidden_state_shift(np.zeros((1, 3)), np.zeros((4, 3)))


# --- mean_hidden_states and the scores on simulated notes --------------------------------


@pytest.fixture(scope="module")
def lm():
    job = Job.from_config(compose_config(["experiment=smoke"]), run_id="t")
    return site_model(job, "cpu")


def _encode(lm, texts):
    return encode_texts(lm.tokenizer, texts, 256)


def test_mean_hidden_states_ignore_padding_and_the_adapter(lm):
    short, long = "Pt reports chest pain.", "Patient reports chest pain for two weeks, worse at night. " * 3
    together = mean_hidden_states(lm.model, _encode(lm, [short, long]), batch_size=2)  # short is padded
    alone = mean_hidden_states(lm.model, _encode(lm, [short]), batch_size=1)
    assert together.shape == (2, alone.shape[1])
    np.testing.assert_allclose(together[0], alone[0], atol=1e-4)
    saved = adapter_arrays(lm.model)
    try:  # a non-zero adapter changes the model's output but not the base model's states
        load_adapter_arrays(lm, {k: np.full_like(v, 0.05) for k, v in saved.items()})
        np.testing.assert_allclose(mean_hidden_states(lm.model, _encode(lm, [short]), 1), alone, atol=1e-5)
    finally:
        load_adapter_arrays(lm, saved)


def _scores(lm, reference: list[str], new: list[str]) -> tuple[float, float]:
    ref, cur = _encode(lm, reference), _encode(lm, new)
    ids = [[row[m.bool()].tolist() for row, m in zip(*d.tensors, strict=True)] for d in (ref, cur)]
    js = token_js_divergence(ids[0], ids[1], len(lm.tokenizer))
    return js, hidden_state_shift(mean_hidden_states(lm.model, ref, 64), mean_hidden_states(lm.model, cur, 64))


def test_scores_are_near_zero_without_drift_and_high_with_it(lm):
    n = 100
    before = [r["text"] for r in step_arrivals(0, 1, n, seed=0, drifted=False, mix=MIX)]
    same = [r["text"] for r in step_arrivals(0, 2, n, seed=0, drifted=False, mix=MIX)]
    drifted = [r["text"] for r in step_arrivals(0, 3, n, seed=0, drifted=True, mix=MIX)]
    js_same, hidden_same = _scores(lm, before, same)
    js_drift, hidden_drift = _scores(lm, before, drifted)
    print(f"n={n}: same js={js_same:.4f} hidden={hidden_same:.3f}; drifted js={js_drift:.4f} hidden={hidden_drift:.3f}")
    # Measured (seed 0): same 0.0068 / 0.055, drifted 0.24 / 1.9.
    assert js_same < 0.02 and hidden_same < 0.3
    assert js_drift > 0.15 and hidden_drift > 1.0


# --- simulation/drift.py ----------------------------------------------------------------


def test_arrivals_are_deterministic_with_fresh_ids_and_timestamps_in_their_step():
    first = step_arrivals(1, 4, 30, seed=7, drifted=False, mix=MIX, step_s=3600)
    assert first == step_arrivals(1, 4, 30, seed=7, drifted=False, mix=MIX, step_s=3600)
    ids = [r["id"] for r in first]
    assert ids == [f"site1-t4-{n}" for n in range(30)]
    assert not set(ids) & {r["id"] for r in site_notes(1, 200, MIX, 7, site_style(1, 7))}
    stamps = [r["timestamp"] for r in first]
    assert stamps == sorted(stamps) and stamps[0] >= "2026-06-01T04:00:00Z" and stamps[-1] < "2026-06-01T05:00:00Z"
    assert first != step_arrivals(1, 5, 30, seed=7, drifted=False, mix=MIX, step_s=3600)


def test_drifted_notes_use_a_new_template_and_new_words():
    plain = step_arrivals(0, 3, 20, seed=0, drifted=False, mix=MIX)
    drifted = step_arrivals(0, 3, 20, seed=0, drifted=True, mix=MIX)
    old_headers = {h for headers in HEADER_SETS for h in headers}
    assert not old_headers & set(DRIFT_HEADERS)
    assert all(all(h in r["text"] for h in DRIFT_HEADERS) for r in drifted)
    assert all(DRIFT_HEADERS[0] not in r["text"] for r in plain)
    assert (
        rewrite_terminology("Start metoprolol 25 mg twice daily. Order ECG.")
        == "Commence cardiprexol 25 mg every 12 hours. Request 12-lead tracing."
    )
    # One pass: a replacement is never rewritten again, and parts of words are left alone.
    assert rewrite_terminology("daily Started HCT") == "once a day Started HCT"


def test_a_drifted_mix_moves_weight_to_the_specialties_the_site_had_least_of():
    after = drifted_mix(MIX)
    assert list(after) == list(SPECIALTIES) and sum(after.values()) == pytest.approx(1.0)
    rare = sorted(SPECIALTIES, key=lambda s: MIX[s])[:4]
    assert sum(after[s] for s in rare) == pytest.approx(0.8 + 0.2 * sum(MIX[s] for s in rare))
    assert all(after[s] > MIX[s] for s in rare)


def test_the_probe_follows_each_sites_distribution_at_its_step():
    mixes = {f"site-{k:02d}": specialty_mix_for_site(k, dirichlet_alpha=0.5, seed=0) for k in range(3)}
    early = fresh_probe(2, 60, 0, num_sites=3, drifted_sites=1, drift_step=3, mixes=mixes)
    late = fresh_probe(3, 60, 0, num_sites=3, drifted_sites=1, drift_step=3, mixes=mixes)
    assert [r["id"] for r in late] == [f"probe-t3-{n}" for n in range(60)]
    assert not any(DRIFT_HEADERS[0] in r["text"] for r in early)
    share = sum(DRIFT_HEADERS[0] in r["text"] for r in late) / len(late)
    assert 0.15 < share < 0.55  # site 0 of 3 drifted: about a third
    other = fresh_probe(3, 60, 0, num_sites=3, drifted_sites=1, drift_step=3, mixes=mixes, stream="validation")
    assert not {r["text"] for r in other} & {r["text"] for r in late}
    with pytest.raises(ValueError, match="site-02"):
        fresh_probe(3, 5, 0, num_sites=3, drifted_sites=1, drift_step=3, mixes={"site-00": MIX, "site-01": MIX})
