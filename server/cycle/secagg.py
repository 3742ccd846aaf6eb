"""A train round under secure aggregation: Flower's SecAgg+ protocol on the Message API.

Flower 1.41 runs SecAgg+ only as a workflow of its legacy API (``SecAggPlusWorkflow`` needs
a ``LegacyContext`` and a legacy ``Strategy``; research/reliability.md). This is the same
protocol, stage for stage and record key for record key, driven through the Grid by the
round loop (server/cycle/rounds.py) and answered by the sites' client mod
(client/secagg.py); the cryptography is Flower's (key agreement, Shamir shares, share
encryption, quantisation) except the mask generator (fedretrain/secagg.py says why).

1. **setup**: each sampled site makes two key pairs and sends their public keys;
2. **share keys**: each gets its neighbours' public keys and sends Shamir shares of its
   private mask seed and first private key, each encrypted to one neighbour;
3. **collect masked vectors**: each gets the shares addressed to it with the real train
   message, trains, and sends its update (adapter minus global) quantised and masked;
4. **unmask**: the sites that sent a vector send the shares that remove the masks from the
   sum: the mask seed of every site that sent one, the private key of every site that
   dropped out after sharing (to remove the pairwise masks its neighbours added). No site's
   two secrets are ever asked for together.

A site that does not answer a stage by the deadline, or answers it wrongly, drops out; the
round goes on while every secret still needed has ``threshold`` shares among the sites left
and at least ``quorum`` sites' vectors are in the sum, else it raises :class:`QuorumLost`
and nothing of it is used. Flower's workflow removes, for a site that dropped out, the
pairwise mask of every neighbour whether or not that neighbour added one; here only the
masks the remaining sites did add (a site adds one for each neighbour whose shares it got).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedretrain.config.schema import SecureAggregationConfig
from fedretrain.errors import QuorumLost
from fedretrain.secagg import RECORD_KEY_CONFIGS, Key, Stage, mask_stream, unmasked_mean
from server.sites.grid import bound_site, node_name
from strategies.checked import CheckedStrategy, RoundLog, content_bytes
from strategies.validation import error_reason

log = logging.getLogger("fedretrain.server")

Exchange = Callable[[Grid, Iterable[Message]], list[Message]]


@dataclass
class _Protocol:
    """What the coordinator knows in one round of the protocol."""

    threshold: int
    neighbours: dict[int, set[int]]
    active: set[int]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    # destination node -> [(source node, ciphertext)] of the shares addressed to it
    forwarded: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)


def secure_train_round(
    grid: Grid,
    strategy: CheckedStrategy,
    server_round: int,
    messages: Iterable[Message],
    settings: SecureAggregationConfig,
    *,
    quorum: int,
    exchange: Exchange,
) -> tuple[Any, Any]:
    """Run one train round's messages (``strategy.configure_train``'s) under secure aggregation.

    ``exchange(grid, messages)`` sends and returns the replies by the deadline (an error
    reply for each silent site). Returns ``strategy.aggregate_masked``'s new adapter and
    metrics; the round's figures go to the strategy's round log (``secure``).

    Raises
    ------
    QuorumLost
        Too few sites left for the threshold or the quorum at some stage.
    """
    train = {msg.metadata.dst_node_id: msg for msg in messages}
    nodes = sorted(train)
    sampled = len(nodes)
    if sampled < max(2, quorum):
        raise QuorumLost(
            f"round {server_round}: secure aggregation needs at least 2 sites and the quorum {quorum}; "
            f"{sampled} sampled"
        )
    if sampled > settings.max_sites():
        raise QuorumLost(
            f"round {server_round}: {sampled} sites would overflow the modulus "
            f"2**{int(math.log2(settings.modulus_range))} "
            f"at {settings.quantization_range} quantisation levels (at most {settings.max_sites()})"
        )
    shares, threshold = _share_counts(settings, sampled)
    # The smallest power of two that holds the sum of the sampled sites' quantised values: a
    # hostile site can add any value below the modulus, so a tight one bounds what it can do
    # to the mean (a few clipping ranges per value instead of thousands).
    modulus = min(settings.modulus_range, 1 << (sampled * settings.quantization_range).bit_length())
    protocol = _Protocol(threshold=threshold, neighbours=_ring(nodes, shares), active=set(nodes))
    protocol.figures = {"sampled": sampled, "num-shares": shares, "threshold": threshold, "seconds": {}, "bytes": {}}
    group = next(iter(train.values())).metadata.group_id

    def stage(name: str, build: Callable[[int], RecordDict]) -> list[Message]:
        sent = [
            Message(build(n), dst_node_id=n, message_type=MessageType.TRAIN, group_id=group)
            for n in sorted(protocol.active)
        ]
        started = time.perf_counter()
        replies = exchange(grid, sent)
        protocol.figures["seconds"][name] = round(time.perf_counter() - started, 3)
        protocol.figures["bytes"][name] = {
            "down": sum(content_bytes(m) for m in sent),
            "up": sum(content_bytes(m) for m in replies if not m.has_error()),
        }
        return replies

    def setup(node: int) -> RecordDict:
        config: dict[str, Any] = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: sampled,
            Key.SHARE_NUMBER: shares,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: float(settings.clipping_range),
            Key.TARGET_RANGE: settings.quantization_range,
            Key.MOD_RANGE: modulus,
            Key.MAX_WEIGHT: 1.0,  # every site weighs the same: no weight travels
        }
        return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)})

    for reply in _answered(grid, server_round, "setup", stage("setup", setup), protocol):
        config = reply.content.config_records[RECORD_KEY_CONFIGS]
        pk1, pk2 = config.get(Key.PUBLIC_KEY_1), config.get(Key.PUBLIC_KEY_2)
        if not (isinstance(pk1, bytes) and isinstance(pk2, bytes)):
            _drop(grid, server_round, protocol, reply.metadata.src_node_id, "setup: no public keys in its reply")
            continue
        protocol.public_keys[reply.metadata.src_node_id] = (pk1, pk2)
    _check_left(server_round, "setup", protocol, quorum)

    def share_keys(node: int) -> RecordDict:
        keys = {str(n): list(protocol.public_keys[n]) for n in sorted(protocol.neighbours[node] & protocol.active)}
        return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({**keys, Key.STAGE: Stage.SHARE_KEYS})})

    protocol.forwarded = {}
    shared: set[int] = set()
    for reply in _answered(grid, server_round, "share keys", stage("share_keys", share_keys), protocol):
        source = reply.metadata.src_node_id
        config = reply.content.config_records[RECORD_KEY_CONFIGS]
        destinations, ciphertexts = config.get(Key.DESTINATION_LIST), config.get(Key.CIPHERTEXT_LIST)
        expected = (protocol.neighbours[source] & set(protocol.public_keys)) - {source}
        if (
            not isinstance(destinations, list)
            or not isinstance(ciphertexts, list)
            or set(destinations) != expected
            or len(destinations) != len(set(destinations))
            or len(destinations) != len(ciphertexts)
            or not all(isinstance(c, bytes) for c in ciphertexts)
        ):
            _drop(grid, server_round, protocol, source, "share keys: its shares are not one per neighbour")
            continue
        shared.add(source)
        for destination, ciphertext in zip(destinations, ciphertexts, strict=True):
            protocol.forwarded.setdefault(cast(int, destination), []).append((source, cast(bytes, ciphertext)))
    _check_left(server_round, "share keys", protocol, quorum)

    def collect(node: int) -> RecordDict:
        incoming = [(s, c) for s, c in protocol.forwarded.get(node, []) if s in protocol.active]
        config: dict[str, Any] = {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: [c for _, c in incoming],
            Key.SOURCE_LIST: [s for s, _ in incoming],
        }
        content = RecordDict(dict(train[node].content.items()))
        content[RECORD_KEY_CONFIGS] = ConfigRecord(config)
        return content

    # Who holds whose shares: a node stores the shares of each source it is sent here.
    holders = {
        node: {s for s, _ in protocol.forwarded.get(node, []) if s in protocol.active} | {node}
        for node in protocol.active
    }
    collected = stage("collect_masked_vectors", collect)
    accepted = strategy.accept_masked(server_round, collected, modulus=modulus)
    contributors = {reply.node_id for reply in accepted}
    for node in sorted(protocol.active - contributors):
        protocol.active.discard(node)  # its reply was an error or was left out (the strategy logged why)
    _check_left(server_round, "collect masked vectors", protocol, quorum)

    keys = sorted(accepted[0].arrays)
    shapes = [accepted[0].arrays[k].shape for k in keys]
    total = [np.zeros(shape, dtype=np.int64) for shape in shapes]
    for masked in accepted:
        for acc, key in zip(total, keys, strict=True):
            acc += masked.arrays[key]
    dropped = shared - contributors  # shared secrets, then sent no vector: their pairwise masks are in the sum

    def unmask(node: int) -> RecordDict:
        config: dict[str, Any] = {
            Key.STAGE: Stage.UNMASK,
            Key.ACTIVE_NODE_ID_LIST: sorted(contributors & holders[node]),
            Key.DEAD_NODE_ID_LIST: sorted(dropped & holders[node]),
        }
        return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)})

    collected_shares: dict[int, list[bytes]] = {node: [] for node in contributors | dropped}
    for reply in _answered(grid, server_round, "unmask", stage("unmask", unmask), protocol):
        config = reply.content.config_records[RECORD_KEY_CONFIGS]
        owners, pieces = config.get(Key.NODE_ID_LIST), config.get(Key.SHARE_LIST)
        node = reply.metadata.src_node_id
        asked = (contributors | dropped) & holders.get(node, set())
        if (
            not isinstance(owners, list)
            or not isinstance(pieces, list)
            or len(owners) != len(pieces)
            or len(owners) != len(set(owners))
            or not set(owners) <= asked
            or not all(isinstance(p, bytes) and p for p in pieces)
        ):
            _drop(grid, server_round, protocol, node, "unmask: its shares are not the ones asked for")
            continue
        for owner, piece in zip(owners, pieces, strict=True):
            collected_shares[cast(int, owner)].append(cast(bytes, piece))
    short = {n: len(s) for n, s in collected_shares.items() if len(s) < threshold}
    if short:
        node, count = next(iter(sorted(short.items())))
        raise QuorumLost(
            f"round {server_round}: secure aggregation: {len(short)} site(s)' masks cannot be removed "
            f"({node_name(grid, node)}: {count} of the {threshold} shares needed); nothing of the round is used"
        )

    started = time.perf_counter()
    for node in sorted(contributors):
        seed = _rebuilt(grid, server_round, node, collected_shares[node], "mask seed")
        for acc, m in zip(total, mask_stream(seed, modulus, shapes), strict=True):
            acc -= m
    for node in sorted(dropped):
        private_key = _rebuilt_private_key(grid, server_round, node, collected_shares[node], protocol)
        for other in sorted(contributors):
            if node not in holders[other]:
                continue  # it got no shares from the dropped site, so it added no mask for it
            pair_key = generate_shared_key(private_key, bytes_to_public_key(protocol.public_keys[other][0]))
            sign = 1 if other > node else -1  # what ``other`` added (fedretrain/secagg.py ``mask``)
            for acc, m in zip(total, mask_stream(pair_key, modulus, shapes), strict=True):
                acc -= sign * m
    summed = [np.mod(acc, modulus) for acc in total]
    mean = unmasked_mean(summed, len(contributors), settings.clipping_range, settings.quantization_range)
    protocol.figures["seconds"]["unmask_compute"] = round(time.perf_counter() - started, 3)
    protocol.figures.update(
        {
            "summed": len(contributors),
            "modulus": modulus,
            "dropped": [{"node_id": n, "site_id": bound_site(grid, n)} for n in sorted(set(nodes) - contributors)],
        }
    )
    entry = strategy.round_log.setdefault(server_round, RoundLog())
    entry.secure = protocol.figures
    # Every stage's messages, the protocol's three extra exchanges and records included.
    entry.bytes_down = sum(b["down"] for b in protocol.figures["bytes"].values())
    entry.bytes_up = sum(b["up"] for b in protocol.figures["bytes"].values())
    log.info(
        "round %d: secure aggregation summed %d of %d sites' masked updates (%s dropped out)",
        server_round,
        len(contributors),
        sampled,
        len(set(nodes) - contributors),
    )
    ranks = [strategy.rank_of(masked) for masked in accepted]
    return strategy.aggregate_masked(server_round, dict(zip(keys, mean, strict=True)), contributors, ranks)


def _share_counts(settings: SecureAggregationConfig, sampled: int) -> tuple[int, int]:
    """Shares per secret (Flower's rule: odd, or all sites) and the threshold: at least a majority of them.

    Flower allows any threshold of 2 or more; the sites (client/secagg.py) refuse one not
    above half the shares, under which a coordinator telling two groups of neighbours
    different stories of who dropped out could rebuild both of one site's secrets.
    """
    shares = round(settings.num_shares * sampled)
    if shares < sampled and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = sampled
    threshold = min(shares, max(round(settings.reconstruction_threshold * shares), shares // 2 + 1, 2))
    return shares, threshold


def _rebuilt(grid: Grid, server_round: int, node: int, shares: list[bytes], what: str) -> bytes:
    """A site's secret from its shares; QuorumLost (not a crash) when they do not combine."""
    try:
        return combine_shares(shares)
    except Exception as err:  # noqa: BLE001 - a holder's bad share ends the round, not the coordinator
        raise QuorumLost(
            f"round {server_round}: secure aggregation: the shares of {node_name(grid, node)}'s {what} "
            f"do not combine ({type(err).__name__}: {err}); nothing of the round is used"
        ) from None


def _rebuilt_private_key(grid: Grid, server_round: int, node: int, shares: list[bytes], protocol: _Protocol) -> Any:
    """A dropped-out site's first private key from its shares, checked against the public key it sent at setup."""
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    secret = _rebuilt(grid, server_round, node, shares, "private key")
    try:
        private_key = bytes_to_private_key(secret)
        matches = public_key_to_bytes(private_key.public_key()) == protocol.public_keys[node][0]
    except Exception:  # noqa: BLE001 - garbage instead of a key
        matches = False
    if not matches:
        raise QuorumLost(
            f"round {server_round}: secure aggregation: the shares of {node_name(grid, node)}'s private key "
            "rebuild a key that is not the one it announced; nothing of the round is used"
        )
    return private_key


def _ring(nodes: list[int], shares: int) -> dict[int, set[int]]:
    """Flower's neighbourhoods: the nodes in a random ring, each with ``shares // 2`` on either side and itself."""
    order = list(nodes)
    random.SystemRandom().shuffle(order)
    half = shares // 2
    if shares >= len(order):
        return {n: set(order) for n in order}
    return {n: {order[(i + k) % len(order)] for k in range(-half, half + 1)} for i, n in enumerate(order)}


def _answered(grid: Grid, server_round: int, name: str, replies: list[Message], protocol: _Protocol) -> list[Message]:
    """The replies that answered the stage; every other site drops out."""
    good = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            _drop(
                grid,
                server_round,
                protocol,
                node,
                f"{name}: {error_reason(reply)}",
            )
        elif RECORD_KEY_CONFIGS not in reply.content.config_records:
            _drop(grid, server_round, protocol, node, f"{name}: no protocol record in its reply")
        else:
            good.append(reply)
    return good


def _drop(grid: Grid, server_round: int, protocol: _Protocol, node: int, reason: str) -> None:
    protocol.active.discard(node)
    log.warning("round %d: secure aggregation: %s drops out at %s", server_round, node_name(grid, node), reason)


def _check_left(server_round: int, name: str, protocol: _Protocol, quorum: int) -> None:
    """QuorumLost when the sites left cannot finish: fewer than the quorum, or a site with too few neighbours left."""
    if len(protocol.active) < quorum:
        raise QuorumLost(
            f"round {server_round}: secure aggregation: {len(protocol.active)} site(s) left after {name}, "
            f"the quorum is {quorum}; nothing of the round is used"
        )
    for node in protocol.active:
        if len(protocol.neighbours[node] & protocol.active) < protocol.threshold:
            raise QuorumLost(
                f"round {server_round}: secure aggregation: after {name} a site has "
                f"{len(protocol.neighbours[node] & protocol.active)} neighbour(s) left, fewer than the threshold "
                f"{protocol.threshold} its masks need; nothing of the round is used"
            )
