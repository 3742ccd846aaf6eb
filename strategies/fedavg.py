"""Flower's FedAvg with a faster average, and the project's default strategy built on it.

Flower 1.41's ``aggregate_arrayrecords`` deserializes every update with ``np.load`` and
allocates a temporary per addition: about 10x below memory bandwidth
(research/performance.md §4, strategies/aggregation.py, ``benchmarks/bench_aggregation.py``).
``FedAvg`` here replaces that one piece with ``weighted_average`` over zero-copy views;
sampling, messages and metric aggregation stay Flower's. The other algorithms
(strategies/registry.py) are Flower's own: their adapters are a few hundred KB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedretrain.arrays import AdapterSpec, from_array_record, to_array_record
from strategies.aggregation import weighted_average
from strategies.checked import CheckedStrategy


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg, averaging with :func:`strategies.aggregation.weighted_average`."""

    # It reads the replies' records and never changes them (strategies/checked.py hands it the
    # received ones rather than copies).
    reads_replies_only = True

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average of the replies' adapters by ``weighted_by_key``, and Flower's metric aggregate."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        arrays = [from_array_record(next(iter(c.array_records.values()))) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]  # type: ignore[arg-type]
        return to_array_record(weighted_average(arrays, weights)), self.train_metrics_aggr_fn(
            contents, self.weighted_by_key
        )


class FedAvgLoRA(CheckedStrategy):
    """The default strategy: :class:`FedAvg` behind the reply checks (every accepted site weighs the same).

    Parameters
    ----------
    spec, max_abs_value, max_update_norm_ratio, site_of, baseline
        As in :class:`strategies.checked.CheckedStrategy`.
    **kwargs
        Passed to :class:`FedAvg` (``fraction_train``, ``min_train_nodes``, ...).
    """

    def __init__(
        self,
        *,
        spec: AdapterSpec,
        max_abs_value: float | None = None,
        max_update_norm_ratio: float | None = 3.0,
        site_of: Callable[[int], str | None] | None = None,
        baseline: ArrayRecord | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            FedAvg(**kwargs),
            spec=spec,
            max_abs_value=max_abs_value,
            max_update_norm_ratio=max_update_norm_ratio,
            site_of=site_of,
            baseline=baseline,
        )
