"""The run directory: config.yaml, metrics.jsonl, summary.json, loss.png, and the summary table.

Every file is rewritten atomically, so a run killed mid-way leaves complete files
describing the rounds that finished.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedretrain.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


class RunRecorder:
    """Writes one run's directory as the run goes."""

    def __init__(
        self,
        run_dir: Path,
        config_yaml: str,
        keep_rounds: int | None = None,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        """``keep_rounds``: a resumed run keeps its metrics.jsonl lines up to this round.
        ``on_write`` is called after each write of metrics.jsonl and summary.json (the
        cycle's live export to trackers, server/tracking/live.py)."""
        self.run_dir = Path(run_dir)
        self.on_write = on_write
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        metrics = self.run_dir / "metrics.jsonl"
        if keep_rounds is not None and metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            self.rounds = [row for row in rows if row["round"] <= keep_rounds]
        atomic_write_text(self.run_dir / "config.yaml", config_yaml)

    def record_round(self, entry: dict[str, Any]) -> None:
        """Append one round's line to metrics.jsonl (rewriting the small file atomically)."""
        self.rounds.append(entry)
        lines = "".join(json.dumps(finite_or_null(r), sort_keys=True, allow_nan=False) + "\n" for r in self.rounds)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        self._written()

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.run_dir / "summary.json"
        atomic_write_json(path, finite_or_null(summary))
        self._written()
        return path

    def _written(self) -> None:
        if self.on_write is not None:
            self.on_write()

    def plot(self) -> Path:
        """loss.png: validation loss per round (candidate vs baseline) and each site's held-out loss."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        path = self.run_dir / "loss.png"
        fig, (ax_val, ax_sites) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
        rounds = [r["round"] for r in self.rounds]
        ax_val.plot(rounds, [r["validation"]["candidate_loss"] for r in self.rounds], "o-", label="candidate")
        ax_val.plot(rounds, [r["validation"]["baseline_loss"] for r in self.rounds], "k--", label="baseline")
        ax_val.set(title="Coordinator validation set", xlabel="round", ylabel="mean token cross-entropy")
        ax_val.legend()
        for site in sorted({s for r in self.rounds for s in r.get("evaluation", {})}):
            pts = [(r["round"], r["evaluation"][site]) for r in self.rounds if site in r.get("evaluation", {})]
            ax_sites.errorbar(
                [p[0] for p in pts],
                [p[1]["change"] for p in pts],
                yerr=[p[1]["change_noise_std"] for p in pts],
                fmt="o-",
                capsize=3,
                label=site,
            )
        ax_sites.axhline(0.0, color="k", linestyle="--", linewidth=0.8)
        ax_sites.set(
            title="Sites' held-out data (noised; bars: noise std)", xlabel="round", ylabel="loss change vs baseline"
        )
        if ax_sites.lines:
            ax_sites.legend(fontsize=8)
        for ax in (ax_val, ax_sites):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        return save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path


def finite_or_null(obj: Any) -> Any:
    """Replace NaN and infinities with None (JSON null): a broken figure is still recorded."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def format_summary(summary: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    val_b, val_c = summary["baseline_loss"], summary["candidate_loss"]
    lines = [
        f"fedretrain run '{summary['name']}': {summary['rounds']} rounds, {len(summary['sites'])} sites, "
        f"{summary['wall_time_s']:.1f} s",
        "",
        f"{'':28s}{'baseline':>10s}{'candidate':>11s}{'change':>9s}",
        f"{'validation loss':28s}{val_b:10.4f}{val_c:11.4f}{val_c - val_b:+9.4f}",
        f"{'validation perplexity':28s}{_num(_exp(val_b), 2):>10s}{_num(_exp(val_c), 2):>11s}",
        "",
        f"{'site':12s}{'held-out change (noised)':>26s}{'epsilon/ceiling':>17s}{'delta':>9s}{'sigma':>8s}",
    ]
    for site_id, s in sorted(summary["sites"].items()):
        change, std = s.get("heldout_change"), s.get("heldout_change_noise_std")
        shown = "-" if change is None else f"{change:+.4f} +/- {std:.4f}"
        eps = "off" if s["epsilon"] is None else f"{s['epsilon']:.2f}/{s['epsilon_ceiling']:.2f}"
        lines.append(f"{site_id:12s}{shown:>26s}{eps:>17s}{s['delta']:9.0e}{s['noise_multiplier']:8.3f}")
    central = summary.get("central_dp")
    if central:
        lines.append(
            f"{'coordinator (central DP)':28s}epsilon {central['epsilon']:.2f} at delta {central['delta']:.0e} "
            f"({central['clipping']} clipping, sigma {central['noise_multiplier']:g}, {central['rounds']} rounds)"
        )
    for refusal in summary.get("refusals", []):
        lines.append(f"  round {refusal['round']}: {_who(refusal)} left out: {refusal['reason']}")
    for bounded in summary.get("bounded", []):
        lines.append(
            f"  round {bounded['round']}: {_who(bounded)}'s update scaled by {bounded['factor']:.3g} "
            f"to the norm bound {bounded['limit']:.4g}"
        )
    if summary.get("gate"):
        lines += ["", *format_gate(summary)]
    comm = summary["communication"]
    lines += [
        "",
        f"bytes per round: {_size(comm['bytes_down_per_round'])} down, {_size(comm['bytes_up_per_round'])} up; "
        f"per client per round {_size(comm['bytes_per_client_per_round'])} "
        f"({comm['adapter_to_model_ratio']:.2%} of the full model's {_size(comm['full_model_bytes'])})",
        f"run directory: {summary['run_dir']}",
    ]
    return "\n".join(lines)


def format_gate(summary: dict[str, Any]) -> list[str]:
    """The gate's decision and figures, and what the sites did with the version."""
    gate = summary["gate"]
    baseline = summary.get("baseline_version")
    against = f"version {baseline}" if baseline else "the base model"
    rollout = summary.get("rollout")
    if rollout and rollout["decision"] != "promote":
        verb = {"rollback": "ROLLED BACK at its canaries, nothing published", "hold": "HELD at its canaries, pending"}
        head = f"gate: PASSED -> version {rollout['version']} {verb[rollout['decision']]} (baseline: {against})"
    elif summary.get("published_version"):
        head = f"gate: PUBLISH -> version {summary['published_version']} (baseline: {against})"
    elif summary.get("pending_version"):
        head = f"gate: PASSED -> version {summary['pending_version']} awaits approval (baseline: {against})"
    else:
        head = f"gate: REFUSE, nothing published (baseline: {against})"
    lines = [
        head,
        f"  validation improvement {_num(gate['improvement'])} nats "
        f"({gate['confidence']:.0%} bootstrap interval [{_num(gate['ci_low'])}, {_num(gate['ci_high'])}]), "
        f"margin {gate['margin']:.4f}",
    ]
    fed = gate.get("federated")
    if fed:
        lines.append(
            f"  at the sites: improvement {_num(fed['improvement'])} over about {fed['examples']:.0f} "
            f"records, noised (interval [{_num(fed['ci_low'])}, {_num(fed['ci_high'])}])"
        )
    if gate.get("worst_site"):
        lines.append(
            f"  worst site {gate['worst_site']}: held-out loss change {gate['worst_site_change']:+.4f} "
            f"(tolerance {gate['site_tolerance']:.4f})"
        )
    if gate["decision"] == "refuse":
        lines += [f"  refused: {reason}" for reason in gate["reasons"]]
    if rollout:
        lines.append(
            f"  staged rollout ({rollout['mode']}) at {', '.join(rollout['canaries'])}: {rollout['decision']} "
            f"after {rollout['seconds']:.0f} s"
        )
        lines += [f"    {reason}" for reason in rollout["reasons"]]
    student = summary.get("student")
    if student:
        lines.append(format_student(student))
    for name, delivery in (("sync", summary.get("sync")), ("publication", summary.get("publication"))):
        if delivery:
            sent = len(delivery["installed"]) + len(delivery["refused"]) + len(delivery["no_reply"])
            lines.append(
                f"  {name} of version {delivery['version']}: installed at {len(delivery['installed'])}/{sent} "
                f"sites" + "".join(f"; {_who(r)} refused: {r['reason']}" for r in delivery["refused"])
            )
            students = delivery.get("students")
            if students:
                lines.append(
                    f"    its student: installed at {len(students['installed'])} of the sites that chose it"
                    + "".join(f"; {_who(r)} refused: {r['reason']}" for r in students["refused"])
                    + (f"; none to send to {', '.join(students['waiting'])}" if students["waiting"] else "")
                )
    lines.append(f"  registry: {summary['registry']}")
    return lines


def format_student(student: dict[str, Any]) -> str:
    """One line on the student distilled from the published version (server/cycle/distill.py)."""
    if "architecture" not in student:
        return f"  student: none ({'; '.join(student['reasons'])})"
    arch = student["architecture"]
    line = (
        f"  student of version {student['version']}: {arch['layers']} of {arch['teacher_layers']} layers, "
        f"{student['size_share']:.0%} of the parameters, {student['speedup']:.2f}x the tokens/s; held-out loss "
        f"{student['student_loss']:.4f} vs {student['teacher_loss']:.4f} (gap {student['gap']:+.4f}, "
        f"95% interval [{student['ci_low']:+.4f}, {student['ci_high']:+.4f}], tolerance {student['tolerance']}): "
        f"{student['decision']}"
    )
    return line + "".join(f"; {reason}" for reason in student.get("reasons", ()))


def _exp(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 50 else None


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _who(refusal: dict[str, Any]) -> str:
    site = refusal.get("site_id")
    return f"node {refusal['node_id']}" if site is None else f"site {site} (node {refusal['node_id']})"
