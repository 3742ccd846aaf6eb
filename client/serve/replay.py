"""Replay a file of requests and their feedback through the site's service code, in this process.

Each line of the file is one user's request and what they said of the answer::

    {"prompt": "...", "correction": "the text it should have said"}
    {"prompt": "...", "rating": "good"}
    {"prompt": "...", "max_tokens": 8}                  (no feedback)

Every request is answered by :class:`client.serve.app.ServedModel` (so a version on trial
answers in shadow or by its A/B share, as in the live service), journalled, and its feedback
given through :func:`client.serve.feedback.give_feedback` (corrections are ingested) with
source ``replay``. A simulated canary's users are such a file (``replay-traffic``); the
site's own recorded traffic can be replayed the same way.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from client.serve.app import ServedModel
from client.serve.feedback import give_feedback
from client.serve.journal import Journal, now_iso
from fedretrain.config import SiteConfig
from fedretrain.errors import DataValidationError

log = logging.getLogger("fedretrain.client")

DEFAULT_MAX_TOKENS = 8


def read_traffic(path: Path) -> list[dict[str, Any]]:
    """The requests in ``path`` (DataValidationError naming the line and field)."""
    requests = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataValidationError(str(path), number, "line", f"not JSON ({err.msg})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"]:
                raise DataValidationError(str(path), number, "prompt", "a non-empty string is required")
            for key in ("correction", "rating"):
                if key in entry and not isinstance(entry[key], str):
                    raise DataValidationError(str(path), number, key, "must be a string")
            tokens = entry.get("max_tokens", DEFAULT_MAX_TOKENS)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 512:
                raise DataValidationError(str(path), number, "max_tokens", "a whole number in [1, 512]")
            requests.append(entry)
    return requests


def replay(site: SiteConfig, path: Path) -> dict[str, int]:
    """Answer every request of ``path`` and give its feedback; counts of what was done."""
    requests = read_traffic(path)
    served, journal = ServedModel(site), Journal.at(site.state_path)
    counts = {"replayed": 0, "replayed-corrections": 0, "replayed-ratings": 0}
    for entry in requests:
        answer = served.answer(entry["prompt"], entry.get("max_tokens", DEFAULT_MAX_TOKENS), 0.0, 0)
        request_id = "cmpl-" + secrets.token_hex(12)
        journal.record_request({"id": request_id, "at": now_iso(), "prompt": entry["prompt"], **answer})
        counts["replayed"] += 1
        if "correction" in entry:
            give_feedback(site, journal, request_id, correction=entry["correction"], source="replay")
            counts["replayed-corrections"] += 1
        elif "rating" in entry:
            give_feedback(site, journal, request_id, rating=entry["rating"], source="replay")
            counts["replayed-ratings"] += 1
    log.info("site %s: replayed %d requests from %s", site.site_id, counts["replayed"], path)
    return counts
