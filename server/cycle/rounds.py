"""The round loop of a cycle: Flower's ``Strategy.start`` with a deadline, a quorum and resume.

Flower's loop waits without limit for nodes to connect (``sample_nodes``), aggregates
whatever replies arrive, and always starts at round 1. A coordinator of hospitals needs
three things more, so this one piece is replaced; what happens inside a round
(``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``)
is still the strategy's, and messages still travel through Flower's Grid:

- **deadline**: before a round it waits at most ``deadline_s`` for the sites to
  connect, and each stage (train, evaluate) closes at ``deadline_s`` with the replies
  it has; a site that died mid-round costs the others one deadline, not forever;
- **quorum**: a round whose accepted train replies (or connected sites) fall below
  ``quorum`` raises :class:`QuorumLost`; the cycle stops and publishes nothing;
- **resume**: it can start at any round with the global adapter of a checkpoint, and
  calls ``on_round_end`` after every round so the caller can write one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedretrain.config.schema import SecureAggregationConfig
from fedretrain.errors import QuorumLost
from server.sites.grid import NO_REPLY, SiteSubset, bound_site, node_name, wait_for_nodes
from strategies.checked import RejectedReply, RoundLog

log = logging.getLogger("fedretrain.server")

# Asked of every site before a cycle's first round (client/handlers.py answers it).
READY_MESSAGE = "query.ready"


@dataclass(frozen=True)
class RoundPolicy:
    """When a round closes and when it counts.

    Attributes
    ----------
    deadline_s : float
        How long a round waits for sites to connect, and then for each stage's replies.
    quorum : int
        Accepted train replies (and connected sites) a round needs, or the cycle aborts.
    wait_for : int
        Sites to wait for before a round (up to ``deadline_s``); a round starts with
        fewer if at least ``quorum`` are connected by then.
    """

    deadline_s: float
    quorum: int
    wait_for: int


EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
RoundEnd = Callable[[int, ArrayRecord], None]


def run_rounds(
    grid: Grid,
    strategy: Any,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    policy: RoundPolicy,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: EvaluateFn,
    on_round_end: RoundEnd,
    ready_config: ConfigRecord | None = None,
    base_sha256: str | None = None,
    secure: SecureAggregationConfig | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds`` from ``arrays``; return the final global adapter.

    With ``ready_config`` (the job), every site is first asked whether it can train the
    cycle (``query.ready``: its data and its budget, nothing spent), and which base model
    it has; only the sites that are ready, with ``base_sha256`` (the coordinator's base
    model identity) as theirs, train, and too few of them abort the cycle before any site
    trains.

    With ``secure``, each train round runs Flower's SecAgg+ protocol (server/cycle/secagg.py):
    the strategy (a plain mean) gets only the sum of the sites' masked updates.

    ``evaluate_fn(0, arrays)`` scores the starting point when ``first_round`` is 1, and
    ``evaluate_fn(r, arrays)`` each round's candidate on the coordinator's own data. The
    sites evaluate only the final round's candidate.

    Raises
    ------
    QuorumLost
        Fewer than ``policy.quorum`` sites connected by the deadline, or fewer
        accepted train replies than that: nothing of the round is used.
    """
    if first_round == 1:
        evaluate_fn(0, arrays)
    if ready_config is not None and first_round <= num_rounds:
        grid, policy = _ready_sites(grid, strategy, first_round, ready_config, policy, base_sha256)
    for server_round in range(first_round, num_rounds + 1):
        nodes = wait_for_nodes(grid, max(policy.wait_for, policy.quorum), policy.deadline_s)
        if len(nodes) < policy.quorum:
            raise QuorumLost(
                f"round {server_round}: {len(nodes)} site(s) connected after {policy.deadline_s:.0f} s, "
                f"the quorum is {policy.quorum}"
            )
        # The strategy samples from this round's snapshot, so its sampling never waits.
        round_grid = SiteSubset(grid, nodes)
        messages = _in_round(strategy.configure_train(server_round, arrays, train_config, round_grid), server_round)
        if secure is not None:
            from server.cycle.secagg import secure_train_round

            new_arrays, metrics = secure_train_round(
                grid,
                strategy,
                server_round,
                messages,
                secure,
                quorum=policy.quorum,
                exchange=lambda g, m: _exchange(g, m, policy),
            )
        else:
            new_arrays, metrics = strategy.aggregate_train(server_round, _exchange(grid, messages, policy))
        accepted = int(metrics["accepted-replies"]) if metrics is not None else 0
        if new_arrays is None or accepted < policy.quorum:
            raise QuorumLost(
                f"round {server_round}: {accepted} accepted train repl{'y' if accepted == 1 else 'ies'} "
                f"by the {policy.deadline_s:.0f} s deadline, the quorum is {policy.quorum}"
            )
        arrays = new_arrays
        if server_round == num_rounds:
            # Sites score only the cycle's final candidate, the one the gate decides on: each
            # evaluation is a noised release charged to their budgets (client/round/site.py).
            evaluate = strategy.configure_evaluate(server_round, arrays, evaluate_config, round_grid)
            replies = _exchange(grid, _in_round(evaluate, server_round), policy)
            strategy.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, arrays)
        on_round_end(server_round, arrays)
    return arrays


def _ready_sites(
    grid: Grid, strategy: Any, first_round: int, job: ConfigRecord, policy: RoundPolicy, base_sha256: str | None
) -> tuple[Grid, RoundPolicy]:
    """The sites ready to train (a view of ``grid``), and the policy waiting for no more than them.

    A site that refuses (a bad data file, a cycle its budget cannot pay for), does not
    answer by the deadline, or has another base model than ``base_sha256`` (its scores
    would be of another model than the coordinator's) is left out of the cycle's training,
    recorded as a refusal of ``first_round``.

    Raises
    ------
    QuorumLost
        Fewer than ``policy.quorum`` sites are connected by the deadline (none is
        asked) or ready: no site has trained or spent.
    """
    from server.sites.broadcast import broadcast

    nodes = wait_for_nodes(grid, max(policy.wait_for, policy.quorum), policy.deadline_s)
    if len(nodes) < policy.quorum:  # asking would cost the sites a check and change nothing
        raise QuorumLost(
            f"before round {first_round}: {len(nodes)} site(s) connected after {policy.deadline_s:.0f} s, "
            f"the quorum is {policy.quorum}; no site was asked to train"
        )
    content = RecordDict({"config": ConfigRecord({**dict(job), "server-round": first_round})})
    sent = broadcast(
        grid,
        content,
        READY_MESSAGE,
        policy.deadline_s,
        lambda site, node, reply: str(reply["base-model"]["sha256"]),
        what="ready",
        node_ids=nodes,
    )
    log_entry = strategy.round_log.setdefault(first_round, RoundLog())
    for site, (node, theirs) in list(sent.answered.items()):
        if base_sha256 is not None and theirs != base_sha256:
            del sent.answered[site]
            reason = (
                f"its base model ({theirs[:12]}) is not the coordinator's ({base_sha256[:12]}): "
                "its training and scores would be of another model"
            )
            sent.refused.append({"node_id": node, "site_id": bound_site(grid, node), "reason": reason, "code": None})
    for refused in sent.refused:
        log.warning("%s left out of this cycle's training: %s", node_name(grid, refused["node_id"]), refused["reason"])
        log_entry.rejected.append(RejectedReply(**refused))
    for node in sent.no_reply:
        reason = f"no answer to the ready check within {policy.deadline_s:.0f} s"
        log.warning("%s left out of this cycle's training: %s", node_name(grid, node), reason)
        log_entry.rejected.append(RejectedReply(node_id=node, site_id=bound_site(grid, node), reason=reason))
    ready = sorted(node for node, _ in sent.answered.values())
    if len(ready) < policy.quorum:
        raise QuorumLost(
            f"before round {first_round}: {len(ready)} site(s) ready to train (valid data, budget for the cycle), "
            f"the quorum is {policy.quorum}; no site trained"
        )
    return SiteSubset(grid, ready), dataclasses.replace(policy, wait_for=min(policy.wait_for, len(ready)))


def _in_round(messages: Iterable[Message], server_round: int) -> list[Message]:
    """``messages`` grouped under their round (Flower's strategies leave ``group_id`` empty):
    the run directory's live.json and the SuperLink's records then say which round each is."""
    out = list(messages)
    for msg in out:
        if not msg.metadata.group_id:
            msg.metadata.group_id = str(server_round)
    return out


def _exchange(grid: Grid, messages: Iterable[Message], policy: RoundPolicy) -> list[Message]:
    """Send ``messages``; the replies that arrived by the deadline, and an error reply for each site that did not.

    A silent site's error reply ("site S (node N): no reply by the 60 s deadline") is
    recorded by the strategy like any failed site, so the round log, the metrics and
    the summary name it.
    """
    messages = list(messages)
    if not messages:
        return []
    replies = list(grid.send_and_receive(messages, timeout=policy.deadline_s))
    answered = {reply.metadata.reply_to_message_id for reply in replies}
    silent = [msg for msg in messages if msg.metadata.message_id not in answered]
    if silent:
        log.warning(
            "%d of %d sites did not reply by the %.0f s deadline (%s); the round goes on without them",
            len(silent),
            len(messages),
            policy.deadline_s,
            ", ".join(node_name(grid, msg.metadata.dst_node_id) for msg in silent),
        )
    return replies + [
        Message(
            Error(
                code=NO_REPLY,
                reason=f"{node_name(grid, msg.metadata.dst_node_id)}: no reply "
                f"by the {policy.deadline_s:.0f} s deadline",
            ),
            reply_to=msg,
        )
        for msg in silent
    ]


def random_state() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The coordinator process's random state: JSON parts, and torch's as a tensor."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    return state, {"torch": torch.get_rng_state().numpy()}


def restore_random_state(state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Undo :func:`random_state`: sampling after a resume draws what it would have drawn."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(np.array(tensors["torch"], dtype=np.uint8)))
