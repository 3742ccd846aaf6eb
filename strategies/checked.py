"""The seam between Flower's strategies and the replies sites send: every reply checked first.

``CheckedStrategy`` wraps any Flower Message-API strategy the way Flower's DP wrappers
wrap one: sampling, messaging and the algorithm are the wrapped strategy's; what reaches
the algorithm is decided here. Flower's strategies trust what a site says:
``num-examples`` sets its weight, NaN passes straight through, and one malformed reply
raises ``InconsistentMessageReplies`` for the whole round (research/reliability.md §3).
Here each train reply is validated on its own (``strategies.validation``: identity,
round tag, size, keys, shapes, dtypes, finite values); a bad one is logged with its site
and node and left out, and the round goes on with the rest. Sites send no record count
(it would disclose their size, and a site could claim any): each accepted reply reaches
the wrapped strategy as one ArrayRecord and ``num-examples = 1``, so every site weighs
the same in any weighted algorithm. An update farther from the global adapter than
``max_update_norm_ratio`` times the round's median distance is scaled back to it first
(``strategies.update_bound``), whatever the algorithm. The algorithm's result is checked
against the adapter spec like a reply.

Evaluation is the gate's protocol, not an algorithm's: each site scores the candidate
against the published version on its own records and sends noised sums, which are
pooled here (``aggregate_evaluate``); the wrapped strategy only samples the sites.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvgM, Strategy

from fedretrain.arrays import AdapterSpec, check_adapter, from_array_record, record_digest, to_array_record
from fedretrain.errors import AdapterMismatchError, QuorumLost, ReplyRejected
from fedretrain.lora_ranks import adapter_rank, changed_beyond, rescale_components
from strategies.update_bound import bound_update_norms
from strategies.validation import (
    RANK_METRIC,
    AcceptedReply,
    Metrics,
    RoundTag,
    SiteEvaluation,
    site_id_of,
    validate_evaluate_reply,
    validate_masked_reply,
    validate_train_reply,
)


@dataclass
class RejectedReply:
    """A reply left out of a round, and why (``code``: the error reply's code, if it was one)."""

    node_id: int
    site_id: str | None
    reason: str
    code: int | None = None


@dataclass
class RoundLog:
    """What happened in one round, as plain data for the run directory.

    Attributes
    ----------
    sampled : int
        Train messages sent.
    bytes_down, bytes_up : int
        Record bytes of the train messages sent, and of the arrays in the train
        replies received (accepted or not).
    accepted : dict[str, dict]
        site-id -> train metrics of the reply, plus ``"node-id"``.
    rejected : list[RejectedReply]
        Train replies left out.
    evaluation : dict[str, SiteEvaluation]
        site-id -> the site's accepted evaluate reply, typed (the gate decides on these).
    evaluation_rejected : list[RejectedReply]
        Evaluate replies left out.
    bounded : dict[str, dict]
        site-id -> ``node-id``, ``norm`` (its distance from the global adapter),
        ``limit`` and ``factor`` for each update scaled back to the norm bound.
    secure : dict
        A secure-aggregation round's figures (server/cycle/secagg.py): seconds and bytes
        per stage, sites sampled, dropped and summed.
    """

    sampled: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    accepted: dict[str, Metrics] = field(default_factory=dict)
    rejected: list[RejectedReply] = field(default_factory=list)
    evaluation: dict[str, SiteEvaluation] = field(default_factory=dict)
    evaluation_rejected: list[RejectedReply] = field(default_factory=list)
    bounded: dict[str, Metrics] = field(default_factory=dict)
    secure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy; an evaluation as its reply's metrics plus ``"node-id"``."""
        data = dataclasses.asdict(self)
        data["evaluation"] = {site: {"node-id": e.node_id, **e.metrics} for site, e in self.evaluation.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundLog:
        """Undo :meth:`to_dict` (a checkpoint's round log)."""
        rejected = [RejectedReply(**r) for r in data.get("rejected", [])]
        evaluation_rejected = [RejectedReply(**r) for r in data.get("evaluation_rejected", [])]
        evaluation = {
            site: SiteEvaluation.from_metrics(site, int(m["node-id"]), {k: v for k, v in m.items() if k != "node-id"})
            for site, m in data.get("evaluation", {}).items()
        }
        return cls(
            **{
                **data,
                "rejected": rejected,
                "evaluation_rejected": evaluation_rejected,
                "evaluation": evaluation,
            }
        )


def content_bytes(msg: Message) -> int:
    """A message's record bytes (0 for an error reply).

    Flower's ConfigRecord.count_bytes reads v[0] of every list value and raises IndexError on
    an empty one (a secure-aggregation stage's empty list of dropped-out nodes): such values
    are counted as nothing."""
    if not msg.has_content():
        return 0
    return sum(
        ConfigRecord({k: v for k, v in record.items() if v != []}).count_bytes()
        if isinstance(record, ConfigRecord)
        else record.count_bytes()
        for record in msg.content.values()
    )


def _array_bytes(msg: Message) -> int:
    if not msg.has_content():
        return 0
    return sum(record.count_bytes() for record in msg.content.array_records.values())


class CheckedStrategy(Strategy):
    """A Flower strategy behind the reply checks, equal weights and the update norm bound.

    Parameters
    ----------
    strategy : Strategy
        The algorithm: any Flower Message-API strategy whose train replies are one
        ArrayRecord and one MetricRecord weighted by ``"num-examples"`` (FedAvg and its
        descendants: FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian,
        FedTrimmedAvg, Krum, MultiKrum, Bulyan, and Flower's DP wrappers around them).
    spec : AdapterSpec
        Keys, shapes and dtypes every reply's adapter (and the algorithm's result) must match.
    max_abs_value : float | None (default: None)
        Replies holding any adapter value larger than this in magnitude are rejected.
    max_update_norm_ratio : float | None (default: 3.0)
        ``c`` >= 1: an update farther from the round's global adapter than ``c`` times
        the median distance of the round's accepted updates is scaled back to that
        distance before the algorithm sees it; None: no bound. Without a global adapter
        recorded by ``configure_train`` (a direct call), distances are taken from zero.
    site_of : Callable[[int], str | None] | None (default: None)
        The site the runtime binds a node to (server/sites/grid.py ``BoundGrid.site_of``):
        names the site of a left-out reply that carries none (an error reply, a
        silent site). Replies themselves reach the strategy already bound.
    baseline : ArrayRecord | None (default: None)
        The adapter published now. Every evaluate message carries it as
        ``"baseline"`` so each site scores candidate and baseline on the same
        records in one message; None: the baseline is the bare base model.
    frozen : Collection[str] (default: ())
        Adapter keys no site trains (FFA-LoRA's lora_A): a reply must send them back
        exactly as it got them, and the aggregate keeps the global adapter's.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        strategy: Strategy,
        *,
        spec: AdapterSpec,
        max_abs_value: float | None = None,
        max_update_norm_ratio: float | None = 3.0,
        site_of: Callable[[int], str | None] | None = None,
        baseline: ArrayRecord | None = None,
        frozen: Collection[str] = (),
    ) -> None:
        if max_update_norm_ratio is not None and not (
            math.isfinite(max_update_norm_ratio) and max_update_norm_ratio >= 1
        ):
            raise ValueError(f"max_update_norm_ratio must be a number >= 1 or None, got {max_update_norm_ratio!r}")
        algorithm = _innermost(strategy)
        for option, value in _FIXED_OPTIONS.items():
            if getattr(algorithm, option, value) != value:
                raise ValueError(f"{type(algorithm).__name__}: {option} must be {value!r} behind the reply checks")
        unknown = sorted(set(frozen) - set(spec.keys))
        if unknown:
            raise ValueError(f"frozen keys {unknown[:3]} are not in the adapter")
        self.strategy = strategy
        self.spec = spec
        self.frozen = tuple(frozen)
        # The adapter's LoRA rank (None: not a plain LoRA adapter): a site may train fewer components.
        self.rank = adapter_rank({key: shape for key, shape, _ in spec.entries})
        self.max_abs_value = max_abs_value
        self.max_update_norm_ratio = max_update_norm_ratio
        self.site_of = site_of
        # (round, tensors) of the global adapter the last configure_train sent: the
        # centre of that round's norm bound.
        self._global: tuple[int, dict[str, np.ndarray]] | None = None
        self.baseline = baseline
        self.round_log: dict[int, RoundLog] = {}
        # (message type, round) -> what its replies must echo (configure_* sets it)
        self._tags: dict[tuple[str, int], RoundTag] = {}

    @property
    def algorithm(self) -> Strategy:
        """The algorithm at the core of the wrapped strategy (below any DP wrapper)."""
        return _innermost(self.strategy)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What a checkpoint keeps of this strategy: JSON state and tensors.

        The round log, and the wrapped strategy's server-side state that outlives a
        round (:data:`STATEFUL`: FedAdam's moments, FedAvgM's momentum, an adaptive
        clipping norm), so that a resumed cycle aggregates as an uninterrupted one.
        """
        state: dict[str, Any] = {"round_log": {str(r): entry.to_dict() for r, entry in self.round_log.items()}}
        scalars, tensors = _server_state(self.strategy)
        state["server"] = scalars
        return state, tensors

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed cycle)."""
        self.round_log = {int(r): RoundLog.from_dict(entry) for r, entry in state["round_log"].items()}
        _restore_server_state(self.strategy, state.get("server", {}), tensors)

    def summary(self) -> None:
        """Log the wrapped strategy's summary and the checks in front of it."""
        self.strategy.summary()
        log(
            INFO,
            "\t└──> Reply checks: adapter of %d tensors, %.2f MB",
            len(self.spec.entries),
            self.spec.nbytes / 1024**2,
        )
        log(INFO, "\t\t└── Weights: equal per accepted site")
        bound = (
            "off"
            if self.max_update_norm_ratio is None
            else f"{self.max_update_norm_ratio:g} x the round's median distance from the global adapter"
        )
        log(INFO, "\t\t└── Update norm bound: %s", bound)

    def _round(self, server_round: int) -> RoundLog:
        return self.round_log.setdefault(server_round, RoundLog())

    def _reject(self, server_round: int, msg: Message, reason: str, into: list[RejectedReply], what: str) -> None:
        """Log a left-out reply (``what``: "reply" or "evaluate reply") and record it."""
        node_id = msg.metadata.src_node_id
        # Bound by the runtime where there is a roster; otherwise only what the reply claims.
        bound = self.site_of(node_id) if self.site_of is not None else None
        log(
            WARNING,
            "round %d: %s from %s left out: %s",
            server_round,
            what,
            f"node {node_id}" if bound is None else f"site {bound} (node {node_id})",
            reason,
        )
        site_id = bound if self.site_of is not None else site_id_of(msg)
        code = int(msg.error.code) if msg.has_error() else None
        into.append(RejectedReply(node_id=node_id, site_id=site_id, reason=reason, code=code))

    def _tag(self, kind: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ConfigRecord:
        """A copy of ``config`` naming the global adapter; its replies must echo round and digest."""
        tag = RoundTag(server_round, record_digest(arrays))
        self._tags[(kind, server_round)] = tag
        tagged = ConfigRecord(dict(config))
        tagged["global-hash"] = tag.global_hash
        return tagged

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's train messages; records how many were sent and their bytes."""
        config = self._tag("train", server_round, arrays, config)
        self._global = (server_round, from_array_record(arrays))
        if isinstance(self.algorithm, FedAvgM):
            # FedAvgM keeps its own last output as the next start (it sets it once, then after
            # each round); the adapter actually sent is the one a resumed cycle starts from too.
            self.algorithm.current_arrays = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        entry = self._round(server_round)
        entry.sampled = len(messages)
        entry.bytes_down = sum(content_bytes(msg) for msg in messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluate messages, each also carrying the baseline adapter when there is one."""
        config = self._tag("evaluate", server_round, arrays, config)
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if self.baseline is not None:
            for msg in messages:
                msg.content["baseline"] = self.baseline
        return messages

    def _accept_train(self, server_round: int, replies: list[Message]) -> list[AcceptedReply]:
        """Validate each reply (adapter included); log and record the rejected ones."""

        def check(msg: Message) -> AcceptedReply:
            reply = validate_train_reply(
                msg, self.spec, max_abs_value=self.max_abs_value, expected=self._tags.get(("train", server_round))
            )
            if self._is_global(server_round, reply.arrays):
                # A free-rider's signature (DP noise makes an honest update differ); it
                # would also have no direction to clip (Flower's clipping divides by its norm).
                raise ReplyRejected("its adapter is the global adapter unchanged: it trained nothing")
            self._check_frozen(server_round, reply.arrays)
            self._check_rank(server_round, reply)
            return reply

        return self._accept(server_round, replies, check)

    def _accept(
        self, server_round: int, replies: Iterable[Message], check: Callable[[Message], AcceptedReply]
    ) -> list[AcceptedReply]:
        """Each reply that passes ``check`` and is its node's and its site's only one; log and record the rest."""
        entry = self._round(server_round)
        accepted: list[AcceptedReply] = []
        nodes: set[int] = set()
        for msg in replies:
            try:
                # One vote per node and per site: a second reply would double its weight.
                if msg.metadata.src_node_id in nodes:
                    raise ReplyRejected(f"node {msg.metadata.src_node_id} already replied this round")
                nodes.add(msg.metadata.src_node_id)
                reply = check(msg)
                if reply.site_id in entry.accepted:
                    raise ReplyRejected(f"site-id {reply.site_id!r} already replied this round")
            except ReplyRejected as err:
                self._reject(server_round, msg, str(err), entry.rejected, "reply")
                continue
            accepted.append(reply)
            # The node the runtime bound the reply to, after the site's metrics: a metric of the
            # site's own named "node-id" must not stand in for it.
            entry.accepted[reply.site_id] = {**reply.metrics, "node-id": reply.node_id}
        # Replies arrive in network order; a fixed order makes the float sums, and so a
        # resumed run's adapter, identical to an uninterrupted run's.
        return sorted(accepted, key=lambda reply: reply.site_id)

    def _is_global(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> bool:
        if self._global is None or self._global[0] != server_round:
            return False
        centre = self._global[1]
        trained = [key for key in arrays if key in centre and key not in self.frozen]
        return bool(trained) and all(np.array_equal(arrays[key], centre[key]) for key in trained)

    def _check_frozen(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        if not self.frozen or self._global is None or self._global[0] != server_round:
            return
        centre = self._global[1]
        changed = [key for key in self.frozen if not np.array_equal(arrays[key], centre[key])]
        if changed:
            raise ReplyRejected(
                f"{len(changed)} frozen tensor(s) changed (lora.freeze_a: only lora_B trains), e.g. {changed[0]!r}"
            )

    def rank_of(self, reply: AcceptedReply) -> int:
        """The LoRA rank a reply says its site trained (the adapter's own if it says none)."""
        value = reply.metrics.get(RANK_METRIC)
        if value is None or self.rank is None:
            return self.rank or 0
        if value != int(value) or not 1 <= value <= self.rank:
            raise ReplyRejected(f"{RANK_METRIC} must be a whole number in [1, {self.rank}], got {value!r}")
        return int(value)

    def _check_rank(self, server_round: int, reply: AcceptedReply) -> None:
        """A site of a lower rank must send every component beyond it back as it got it."""
        rank = self.rank_of(reply)
        if self.rank is None or rank == self.rank:
            return
        if type(self.algorithm).__name__ not in PLAIN_MEANS:
            raise ReplyRejected(
                f"it trained LoRA rank {rank} of {self.rank}: mixed ranks are averaged component by component, "
                f"which only a plain mean ({', '.join(PLAIN_MEANS)}) can do, not {type(self.algorithm).__name__}"
            )
        if self._global is not None and self._global[0] == server_round:
            changed = changed_beyond(reply.arrays, self._global[1], rank)
            if changed:
                raise ReplyRejected(
                    f"it trained LoRA rank {rank} of {self.rank} but changed components beyond it in "
                    f"{len(changed)} tensor(s), e.g. {changed[0]!r}"
                )

    def _per_component(self, server_round: int, result: dict[str, np.ndarray], ranks: list[int]) -> bool:
        """Make ``result`` (the plain mean) each component's mean over the sites that trained it; whether it changed."""
        if self.rank is None or all(rank == self.rank for rank in ranks) or self._global is None:
            return False
        if self._global[0] != server_round:
            raise AggregationError(f"round {server_round}: mixed LoRA ranks need the global adapter this round sent")
        trained = [key for key in result if key not in self.frozen]
        rescaled = rescale_components({key: result[key] for key in trained}, self._global[1], ranks)
        result.update(rescaled)
        log(INFO, "round %d: mixed LoRA ranks %s averaged component by component", server_round, sorted(ranks))
        return True

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate of the valid replies, each site weighing the same.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The aggregated adapter (checked against the spec) and ``accepted-replies``
            and ``rejected-replies``; ``(None, None)`` if no reply was valid, so the
            global adapter stays as it is.

        Raises
        ------
        QuorumLost
            The algorithm returned nothing from valid replies (Bulyan with fewer than
            ``4 num_malicious_nodes + 3`` of them): the cycle aborts, nothing published.
        AggregationError
            The algorithm returned an adapter that does not match the spec.
        """
        replies = list(replies)
        entry = self._round(server_round)
        entry.bytes_up += sum(_array_bytes(msg) for msg in replies)
        accepted = self._accept_train(server_round, replies)
        log(INFO, "round %d: %d train replies accepted, %d left out", server_round, len(accepted), len(entry.rejected))
        if not accepted:
            log(WARNING, "round %d: no valid train reply; the global adapter is unchanged", server_round)
            return None, None
        # Flower's FedMedian, FedTrimmedAvg and Bulyan empty the records they are handed; an
        # algorithm that only reads them (ours, strategies/fedavg.py) gets the received ones.
        shared = bool(getattr(self.algorithm, "reads_replies_only", False))
        clean = [
            _clean_reply(reply, bounded, copy_record=not shared)
            for reply, bounded in zip(accepted, self._bounded(server_round, accepted), strict=True)
        ]
        aggregated, _ = self.strategy.aggregate_train(server_round, clean)
        if aggregated is None:  # e.g. Bulyan below 4f + 3 replies: too few for the algorithm
            raise QuorumLost(
                f"round {server_round}: {type(self.algorithm).__name__} aggregated nothing from "
                f"{len(accepted)} accepted repl{'y' if len(accepted) == 1 else 'ies'} (too few for its options)"
            )
        dtypes = {key: np.dtype(dtype) for key, _, dtype in self.spec.entries}
        try:
            views = from_array_record(aggregated)  # zero-copy
            # Flower's aggregates may come back in float64; the adapter travels in the spec's dtypes.
            repack = bool(self.frozen) or any(v.dtype != dtypes.get(k, v.dtype) for k, v in views.items())
            result = {key: np.asarray(value, dtype=dtypes.get(key, value.dtype)) for key, value in views.items()}
            check_adapter(result, self.spec)
            if self._per_component(server_round, result, [self.rank_of(reply) for reply in accepted]):
                repack = True
            if self.frozen and self._global is not None and self._global[0] == server_round:
                # Identical copies average to themselves up to float rounding; keep them exact.
                result.update({key: np.array(self._global[1][key]) for key in self.frozen})
        except AdapterMismatchError as err:
            raise AggregationError(f"round {server_round}: {type(self.algorithm).__name__}'s aggregate: {err}") from err
        metrics = MetricRecord(
            {
                "accepted-replies": len(accepted),
                "rejected-replies": len(entry.rejected),
            }
        )
        return (to_array_record(result) if repack else aggregated), metrics

    def accept_masked(self, server_round: int, replies: Iterable[Message], *, modulus: int) -> list[AcceptedReply]:
        """Secure aggregation: validate each masked train reply (``validate_masked_reply``); log and record the rest.

        What a masked reply hides cannot be checked here (finite values, magnitude,
        distance, a free-rider's unchanged adapter, frozen tensors): the sum is checked
        instead, by :meth:`aggregate_masked`.
        """

        def check(msg: Message) -> AcceptedReply:
            reply = validate_masked_reply(
                msg, self.spec, modulus=modulus, expected=self._tags.get(("train", server_round))
            )
            self.rank_of(reply)
            return reply

        # The round's bytes are the protocol's stages' (server/cycle/secagg.py counts them).
        return self._accept(server_round, replies, check)

    def aggregate_masked(
        self,
        server_round: int,
        mean_update: Mapping[str, np.ndarray],
        contributors: Collection[int],
        ranks: list[int] | None = None,
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Secure aggregation: the global adapter plus the unmasked mean update of ``contributors`` (node ids).

        The result is checked like any aggregate (the spec, finite values,
        ``max_abs_value``); frozen tensors keep the global adapter's values.

        Raises
        ------
        AggregationError
            The sum, once unmasked, is not a valid adapter: one or more sites sent a
            broken or hostile update that no per-site check could see.
        """
        if self._global is None or self._global[0] != server_round:
            raise AggregationError(f"round {server_round}: secure aggregation needs the global adapter it sent")
        centre = self._global[1]
        dtypes = {key: np.dtype(dtype) for key, _, dtype in self.spec.entries}
        result = {
            key: (np.asarray(centre[key], dtype=np.float64) + mean_update[key]).astype(dtypes[key])
            for key in self.spec.keys
        }
        if ranks:  # each site's rank is in its plain metrics; what it sent beyond it cannot be checked
            self._per_component(server_round, result, ranks)
        result.update({key: np.array(centre[key]) for key in self.frozen})
        try:
            check_adapter(result, self.spec, max_abs=self.max_abs_value)
        except AdapterMismatchError as err:
            raise AggregationError(
                f"round {server_round}: the securely aggregated adapter of {len(contributors)} sites: {err} "
                "(no single site's update can be checked under secure aggregation)"
            ) from err
        entry = self._round(server_round)
        metrics = MetricRecord({"accepted-replies": len(contributors), "rejected-replies": len(entry.rejected)})
        return to_array_record(result), metrics

    def _bounded(self, server_round: int, accepted: list[AcceptedReply]) -> list[Mapping[str, np.ndarray] | None]:
        """Per accepted reply, its update scaled back to the norm bound, or None where it is kept as sent.

        Each scaled update is logged and recorded."""
        untouched: list[Mapping[str, np.ndarray] | None] = [None] * len(accepted)
        if self.max_update_norm_ratio is None:
            return untouched
        updates = [reply.arrays for reply in accepted]
        if self._global is not None and self._global[0] == server_round:
            centre = self._global[1]
        else:
            log(
                WARNING,
                "round %d: no global adapter was sent this round; update norms are taken from zero",
                server_round,
            )
            centre = {key: np.zeros_like(value) for key, value in updates[0].items()}
        bounded, bound = bound_update_norms(centre, updates, self.max_update_norm_ratio)
        entry = self._round(server_round)
        out = list(untouched)
        for index, (reply, norm, factor) in enumerate(zip(accepted, bound.norms, bound.factors, strict=True)):
            if factor == 1.0:
                continue
            out[index] = bounded[index]
            log(
                WARNING,
                "round %d: update of site %s (node %d) scaled by %.4g: its distance %.4g from the "
                "global adapter is over %g x the median %.4g",
                server_round,
                reply.site_id,
                reply.node_id,
                factor,
                norm,
                self.max_update_norm_ratio,
                bound.median,
            )
            entry.bounded[reply.site_id] = {
                "node-id": reply.node_id,
                "norm": norm,
                "limit": bound.limit,
                "factor": factor,
            }
        return out

    def _accept_evaluate(self, server_round: int, replies: Iterable[Message]) -> list[SiteEvaluation]:
        entry = self._round(server_round)
        accepted: list[SiteEvaluation] = []
        for msg in replies:
            try:
                result = validate_evaluate_reply(msg, expected=self._tags.get(("evaluate", server_round)))
                if result.site_id in entry.evaluation:
                    raise ReplyRejected(f"site-id {result.site_id!r} already replied this round")
            except ReplyRejected as err:
                self._reject(server_round, msg, str(err), entry.evaluation_rejected, "evaluate reply")
                continue
            accepted.append(result)
            entry.evaluation[result.site_id] = result
        return accepted

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Pool the sites' noised sums of per-record loss changes (candidate - baseline).

        Returns
        -------
        MetricRecord | None
            ``num-examples``, ``diff-sum`` and ``diff-sumsq`` summed over valid replies,
            ``mean-change`` (``diff-sum / num-examples``; negative: the candidate is
            better), ``accepted-replies``, ``rejected-replies``; None if no reply was valid.
        """
        accepted = self._accept_evaluate(server_round, replies)
        rejected = len(self._round(server_round).evaluation_rejected)
        if not accepted:
            log(WARNING, "round %d: no valid evaluate reply (%d left out)", server_round, rejected)
            return None
        totals = {
            key: math.fsum(r.metrics[key] for r in accepted) for key in ("num-examples", "diff-sum", "diff-sumsq")
        }
        return MetricRecord(
            {
                **totals,
                "mean-change": totals["diff-sum"] / max(totals["num-examples"], 1.0),
                "accepted-replies": len(accepted),
                "rejected-replies": rejected,
            }
        )


# Algorithms whose aggregate is the plain mean of the replies: mixed LoRA ranks are averaged
# component by component from it (fedretrain/lora_ranks.py), which no other algorithm allows.
PLAIN_MEANS = ("FedAvg", "FedProx")

# What the wrapped algorithm must leave as Flower's FedAvg has it: the checks hand it one
# ArrayRecord under "arrays" and the weight under "num-examples".
_FIXED_OPTIONS = {"weighted_by_key": "num-examples", "arrayrecord_key": "arrays"}

# Server-side state of Flower's strategies that outlives a round: FedOpt's moments (FedAdam,
# FedYogi, FedAdagrad), FedAvgM's momentum, the adaptive clipping norm of Flower's DP wrapper.
# The global adapter itself (``current_arrays``) is set again by each configure_train.
STATEFUL = ("m_t", "v_t", "momentum_vector", "clipping_norm")


def _innermost(strategy: Strategy) -> Strategy:
    """The algorithm below any wrappers (Flower's DP wrappers keep theirs in ``.strategy``)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy  # type: ignore[attr-defined]
    return strategy


def _layers(strategy: Strategy) -> list[tuple[str, Strategy]]:
    """``strategy`` and every strategy it wraps, each with a path naming it in a checkpoint."""
    out, path = [("", strategy)], ""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy, path = strategy.strategy, path + "strategy."  # type: ignore[attr-defined]
        out.append((path, strategy))
    return out


def _server_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The :data:`STATEFUL` attributes of ``strategy`` and what it wraps: scalars, and tensors by name."""
    scalars: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    for path, layer in _layers(strategy):
        for name in STATEFUL:
            value = getattr(layer, name, None)
            key = path + name
            if value is None:
                continue
            if isinstance(value, int | float):
                scalars[key] = float(value)
            elif isinstance(value, dict):
                scalars[key] = {"dict": sorted(value)}
                tensors.update({f"{key}.{k}": np.asarray(v) for k, v in value.items()})
            else:  # a list of arrays (FedAvgM's momentum)
                scalars[key] = {"list": len(value)}
                tensors.update({f"{key}.{i}": np.asarray(v) for i, v in enumerate(value)})
    return scalars, tensors


def _restore_server_state(strategy: Strategy, scalars: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Undo :func:`_server_state` on a strategy built the same way."""
    layers = dict(_layers(strategy))
    for key, kind in scalars.items():
        path, _, name = key.rpartition(".")
        layer = layers[f"{path}." if path else ""]
        if isinstance(kind, float):
            setattr(layer, name, kind)
        elif "dict" in kind:
            setattr(layer, name, {k: tensors[f"{key}.{k}"] for k in kind["dict"]})
        else:
            setattr(layer, name, [tensors[f"{key}.{i}"] for i in range(kind["list"])])


def _clean_reply(reply: AcceptedReply, bounded: Mapping[str, np.ndarray] | None, *, copy_record: bool) -> Message:
    """What the wrapped strategy sees of an accepted reply: its adapter (bounded, if it was) and weight 1.

    ``copy_record``: hand over a shallow copy of the received record (no tensor bytes copied,
    about 2 ms for 64 tensors), for an algorithm that pops from it."""
    msg = reply.message
    if msg is None:
        raise TypeError("an accepted reply comes from validate_train_reply, with its message")
    clean = copy.copy(msg)  # the metadata stays; the reply as received is not changed
    if bounded is not None:
        arrays = to_array_record(dict(bounded))
    elif copy_record:
        arrays = ArrayRecord(dict(msg.content.array_records["arrays"].items()))
    else:
        arrays = msg.content.array_records["arrays"]
    clean.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
    return clean
