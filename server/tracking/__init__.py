"""Export runs to the trackers people already use: MLflow and TensorBoard.

What an export copies: each round's metrics.jsonl line as metrics at ``step=round``, the
run's config.yaml as parameters, the gate's figures and decision and the published
version from summary.json, and every version of the registry the run publishes into, with
the champion (per the signed chain) as the MLflow model alias ``champion``. It only reads
the run directory and the registry: they stay the one source of truth, and an export can be
redone at any time, adding only what the tracker does not hold yet.

Only the coordinator writes an export, the way NVIDIA FLARE's tracking receivers do: the
cycle itself, in a thread of its own, as it writes its run directory (``tracking.*`` in the
config, :mod:`server.tracking.live`), or ``fedretrain export`` (cli/export.py). MLflow and
TensorBoard are imported only when an export runs (``pip install 'fedretrain[tracking]'``).
"""
