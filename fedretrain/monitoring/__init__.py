"""Drift scores between a site's reference data and its new data (pure functions, one model pass)."""

from fedretrain.monitoring.drift import hidden_state_shift, mean_hidden_states, token_js_divergence

__all__ = ["hidden_state_shift", "mean_hidden_states", "token_js_divergence"]
