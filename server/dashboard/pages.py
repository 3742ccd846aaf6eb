"""The HTML of each page, rendered from exactly the data its JSON endpoint returns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from server.dashboard.charts import budget_bar, line_chart
from server.dashboard.layout import command, form, link, num, problems, table, text


def federation_body(view: dict[str, Any]) -> str:
    parts = [_federation(f) for f in view["federations"]] or ['<p class="none">no runs or registries found</p>']
    coordinator = view.get("coordinator")
    if coordinator:
        watch = coordinator.get("watch") or {}
        parts.append(f"<h2>Coordinator folder {text(coordinator['path'])}</h2>")
        seen = _last_seen(view["federations"])
        rows = [[text(s), text(n), text(seen.get(s) or seen.get(n))] for s, n in sorted(coordinator["sites"].items())]
        parts.append(table(["site", "node", "last status poll"], rows))
        if watch:
            parts.append(
                f"<p>standing watch: {'running' if watch.get('running') else 'not running'}, "
                f"{text(watch.get('phase'))}, {text(watch.get('polls'))} polls, {text(watch.get('cycles'))} cycles</p>"
            )
        parts.append(problems(coordinator["problems"]))
    return "".join(parts)


def _last_seen(federations: Sequence[dict[str, Any]]) -> dict[Any, str]:
    """site id (or node id, for a node that did not reply) -> how it answered the watch's last status poll."""
    seen: dict[Any, str] = {}
    for fed in federations:
        watch = fed.get("watch") or {}
        poll = watch.get("poll")
        if not poll:
            continue
        for status in watch.get("statuses") or []:
            seen[status["site_id"]] = f"online: answered at {poll['at']}"
        for refusal in poll["refused"]:
            seen[refusal.get("site_id")] = f"refused at {poll['at']}: {refusal.get('reason')}"
        for node in poll["no_reply"]:
            seen[node] = f"offline: no reply at {poll['at']}"
    return seen


def _federation(fed: dict[str, Any]) -> str:
    registry = fed["registry"]
    title = "Runs without a registry yet" if registry is None else f"Federation of {text(registry['path'])}"
    head = f"<h2>{title}</h2>"
    if registry is not None:
        head += f"<p>{link('versions', registry['registry_id'], 'its versions')}</p>"
    head += "<p>runs, newest first: " + (", ".join(link("cycles", r) for r in fed["runs"][:8]) or "none") + "</p>"
    rows = []
    limits = fed.get("thresholds") or {}
    for site in fed["sites"]:
        run, ledger, status = site.get("run") or {}, site.get("ledger"), site.get("status") or {}
        rows.append(
            [
                text(site["site_id"]),
                budget_bar(site["epsilon_spent"], site["epsilon_ceiling"], projected=status.get("epsilon_projected")),
                text(site["spent_source"]),
                num(run.get("epsilon")),
                "–" if ledger is None else f"{num(ledger['epsilon'])} ({ledger['releases']} releases)",
                text(status.get("model_version", run.get("installed_version"))),
                num(status.get("train_records")),
                num(status.get("new_records")),
                _against(status.get("drift_js"), limits.get("drift_js")),
                _against(status.get("drift_hidden"), limits.get("drift_hidden")),
                num(status.get("loss_new")),
                num(status.get("loss_reference")),
            ]
        )
    headers = ["site", "ε spent / ceiling (→ one more cycle)", "from", "ε after newest run", "ε by ledger"]
    headers += ["installed version", "records held", "new records", "drift JS (bits) / threshold"]
    headers += ["drift hidden / threshold", "loss new", "loss reference"]
    return head + table(headers, rows, numeric=range(3, 12)) + _watch(fed.get("watch")) + problems(fed["problems"])


def _against(score: Any, threshold: Any) -> str:
    """A drift score against its threshold, marked when over it."""
    if score is None:
        return "–"
    shown = f"{num(score)} / {num(threshold)}"
    over = isinstance(threshold, int | float) and isinstance(score, int | float) and score >= threshold
    return f'<span class="problems">{shown} over</span>' if over else shown


def _watch(watch: dict[str, Any] | None) -> str:
    if not watch or not any(watch.get(key) for key in ("state", "poll", "alerts", "cycles", "inflight")):
        return ""  # a registry no watch has run on
    state, poll = watch.get("state") or {}, watch.get("poll")
    out = f"<h3>Watch</h3><p>{text(state.get('polls'))} polls, {text(state.get('cycles'))} cycles"
    if poll:
        refused = ", ".join(f"{text(r.get('site_id'))}: {text(r.get('reason'))}" for r in poll["refused"])
        out += f"; last status poll {text(poll['at'])}, refused: {refused or 'none'}, no reply: {len(poll['no_reply'])}"
    if watch.get("inflight"):
        out += f"; cycle {text(watch['inflight'].get('cycle'))} under way"
    cycles = [
        [
            text(c.get("cycle")),
            text(", ".join(c.get("triggers") or [])),
            text(c.get("decision")),
            text(c.get("published_version")),
            text(", ".join(f"{s}: {why}" for s, why in (c.get("excluded") or {}).items()) or None),
            text(c.get("failure")),
        ]
        for c in watch["cycles"]
    ]
    alerts = [[text(a.get("trigger")), text(a.get("message")), text(a.get("held") or "")] for a in watch["alerts"]]
    return (
        out
        + "</p><h4>Cycles the watch ran (newest first)</h4>"
        + table(["cycle", "triggers", "decision", "published", "left out", "failure"], cycles)
        + "<h4>Alerts (newest first)</h4>"
        + table(["trigger", "message", "held"], alerts)
    )


def cycles_body(runs: list[dict[str, Any]]) -> str:
    rows = [
        [
            link("cycles", r["run_id"]),
            text(r["name"]),
            text(r["state"]),
            f"{text(r['round'])} of {text(r['rounds'])}",
            text(r["decision"]),
            text(r["published_version"]),
            text(r["pending_version"]),
            text(r["last_written"]),
        ]
        for r in runs
    ]
    return table(["run", "name", "state", "round", "gate", "published", "awaits approval", "last written"], rows)


def cycle_body(view: dict[str, Any]) -> str:
    rows, summary = view["metrics"], view["summary"]
    head = (
        f'<p><strong>round <span id="round">{text(view["round"])}</span> of <span id="rounds">'
        f'{text(view["rounds"])}</span></strong>, <span id="state">{text(view["state"])}</span>; '
        f"{text(view['name'])} in {text(view['path'])}"
    )
    if view["registry_id"]:
        head += f"; {link('versions', view['registry_id'], 'registry')}"
    parts = [head + "</p>", _exchange(view), _outcome(summary) if summary else "", _charts(rows, view["split"])]
    parts.append(_rounds(rows))
    parts.append(_sites(summary) if summary else "")
    parts.append("<h2>Refused replies</h2>")
    parts.append(
        table(
            ["round", "site", "node", "code", "reason"],
            [
                [text(r.get("round")), text(r.get("site_id")), text(r.get("node_id")), text(r.get("code"))]
                + [text(r.get("reason"))]
                for r in view["refusals"]
            ],
        )
    )
    parts += [_secure(rows), problems(view["problems"])]
    return "".join(parts)


def _outcome(summary: dict[str, Any]) -> str:
    gate = summary.get("gate") or {}
    out = (
        f'<p>validation loss <span id="baseline-loss">{num(summary.get("baseline_loss"))}</span> (baseline) → '
        f'<span id="candidate-loss">{num(summary.get("candidate_loss"))}</span> (candidate); '
        f"wall time {num(summary.get('wall_time_s'), 1)} s</p>"
    )
    if summary.get("aborted"):
        return out + f"<p class=problems>aborted, nothing published: {text(summary['aborted'])}</p>"
    out += (
        f'<p>gate: <strong id="gate-decision">{text(gate.get("decision"))}</strong>, improvement '
        f"{num(gate.get('improvement'))} (interval [{num(gate.get('ci_low'))}, {num(gate.get('ci_high'))}], "
        f'margin {num(gate.get("margin"))}); published version <span id="published-version">'
        f'{text(summary.get("published_version"))}</span>, awaiting approval <span id="pending-version">'
        f"{text(summary.get('pending_version'))}</span></p>"
    )
    out += "<ul>" + "".join(f"<li>{text(r)}</li>" for r in gate.get("reasons") or []) + "</ul>"
    return out + _robustness(gate.get("robustness"))


def _robustness(figures: Any) -> str:
    """The gate's robustness suite: each perturbation's loss, champion and candidate, and the canaries."""
    if not isinstance(figures, dict):
        return ""
    rows = [
        [text(kind), num(f.get("champion")), num(f.get("candidate")), num(f.get("change"))]
        for kind, f in (figures.get("perturbations") or {}).items()
        if isinstance(f, dict)
    ]
    probe = figures.get("memorisation")
    if isinstance(probe, dict):
        rows.append(
            [
                f"canary exposure ({text(probe.get('canaries'))} planted)",
                num(probe.get("exposure_champion")),
                num(probe.get("exposure_candidate")),
                num(probe.get("change")),
            ]
        )
    head = f"<h2>Robustness ({text(figures.get('records'))} records, tolerance {num(figures.get('tolerance'))})</h2>"
    return head + table(["perturbation", "champion", "candidate", "change"], rows, numeric=(1, 2, 3))


def _sites(summary: dict[str, Any]) -> str:
    sites = summary.get("sites")
    if not isinstance(sites, dict):
        return ""
    rows = [
        [
            text(site),
            f'<span id="epsilon-{text(site)}">{num(s.get("epsilon"))}</span> of {num(s.get("epsilon_ceiling"))}',
            num(s.get("delta"), 8),
            num(s.get("noise_multiplier")),
            text(s.get("rounds_participated")),
            f"{num(s.get('heldout_change'))} ± {num(s.get('heldout_change_noise_std'))}",
        ]
        for site, s in sorted(sites.items())
        if isinstance(s, dict)
    ]
    headers = ["site", "ε spent (lifetime) of ceiling", "δ", "noise multiplier", "rounds", "held-out change (noised)"]
    return "<h2>Sites after this cycle</h2>" + table(headers, rows, numeric=(2, 3, 4))


def _exchange(view: dict[str, Any]) -> str:
    """The exchange with the sites under way: replies in of expected, time left to its deadline, quorum."""
    now = view["exchange"]
    if not now:
        return ""
    deadline = now.get("deadline_at")
    left = ""
    if isinstance(deadline, int | float):
        left = f', <span id="time-left" data-deadline="{deadline}">{max(deadline - time.time(), 0):.0f}</span> s left'
    what = f"{text(now.get('exchange'))} round {text(now.get('round'))}"
    return (
        f'<p class="pending" id="exchange">now: {what}: <span id="replied">{text(now.get("replied"))}</span> of '
        f'<span id="expected">{text(now.get("expected"))}</span> replies in ({text(now.get("errors"))} errors)'
        f"{left}; quorum {text(view['quorum'])}</p>"
    )


def _charts(rows: Sequence[dict[str, Any]], split: Sequence[dict[str, Any]] = ()) -> str:
    def per_site(key: str, field: str) -> dict[str, list[tuple[float, float | None]]]:
        sites = sorted({s for r in rows for s in r.get(key) or {}})
        return {s: [(r["round"], (r.get(key) or {}).get(s, {}).get(field)) for r in rows] for s in sites}

    trained = [r for r in rows if r["round"] > 0]
    validation = {
        "candidate": [(r["round"], (r.get("validation") or {}).get("candidate_loss")) for r in rows],
        "baseline": [(r["round"], (r.get("validation") or {}).get("baseline_loss")) for r in rows],
    }
    traffic = {
        "bytes down": [(r["round"], r.get("bytes_down")) for r in trained],
        "bytes up": [(r["round"], r.get("bytes_up")) for r in trained],
    }
    return "".join(
        [
            "<h2>Per round</h2>",
            line_chart("Validation loss (coordinator)", validation, dashed=["baseline"]),
            line_chart("Sites' held-out loss change (noised)", per_site("evaluation", "change")),
            line_chart("ε per site (lifetime, as reported)", per_site("sites", "epsilon")),
            line_chart("Bytes per round", traffic),
            line_chart("Seconds per round", _seconds(rows, split)),
        ]
    )


def _seconds(
    rows: Sequence[dict[str, Any]], split: Sequence[dict[str, Any]]
) -> dict[str, list[tuple[float, float | None]]]:
    series = {"round": [(r["round"], r.get("round_s")) for r in rows]}
    if split:  # the run directory has live.json's history
        series["sites (exchanges)"] = [(s["round"], s["sites_s"]) for s in split]
        series["coordinator"] = [(s["round"], s["coordinator_s"]) for s in split]
    return series


def _rounds(rows: Sequence[dict[str, Any]]) -> str:
    body = [
        [
            text(r["round"]),
            f"{text(r.get('sites_accepted'))} of {text(r.get('sites_sampled'))}",
            num((r.get("validation") or {}).get("candidate_loss")),
            num((r.get("validation") or {}).get("baseline_loss")),
            text(", ".join(f"{s}: {num(e.get('epsilon'), 3)}" for s, e in sorted((r.get("sites") or {}).items()))),
            text(", ".join(f"{s}: {num(e.get('change'))} ± {num(e.get('change_noise_std'))}" for s, e in _ev(r))),
            num(r.get("bytes_down")),
            num(r.get("bytes_up")),
            num(r.get("round_s"), 3),
            text(len(r.get("rejected") or [])),
        ]
        for r in rows
    ]
    headers = ["round", "accepted", "validation", "baseline", "ε per site", "held-out change (noised)"]
    headers += ["bytes down", "bytes up", "seconds", "refused"]
    return table(headers, body, numeric=(2, 3, 6, 7, 8, 9))


def _ev(row: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return sorted((row.get("evaluation") or {}).items())


def _secure(rows: Sequence[dict[str, Any]]) -> str:
    secure = [(r["round"], r["secure_aggregation"]) for r in rows if isinstance(r.get("secure_aggregation"), dict)]
    if not secure:
        return ""
    body = [
        [
            text(n),
            f"{text(s.get('summed'))} of {text(s.get('sampled'))}",
            text(s.get("threshold")),
            text(s.get("num-shares")),
            text(s.get("modulus")),
            text(", ".join(str(d.get("site_id")) for d in s.get("dropped") or []) or None),
            text(", ".join(f"{k} {num(v, 3)} s" for k, v in (s.get("seconds") or {}).items())),
            text(", ".join(f"{k} {b.get('down')}/{b.get('up')} B" for k, b in (s.get("bytes") or {}).items())),
        ]
        for n, s in secure
    ]
    headers = ["round", "summed", "threshold", "shares", "modulus", "dropped", "seconds", "bytes down/up"]
    return "<h2>Secure aggregation</h2>" + table(headers, body)


def registries_body(registries: list[dict[str, Any]]) -> str:
    rows = [
        [
            link("versions", r["registry_id"], r["path"]),
            text(len(r["versions"])),
            text(r["champion"]),
            text(", ".join(map(str, r["pending"])) or None),
        ]
        for r in registries
    ]
    return table(["registry", "versions", "champion", "awaiting approval"], rows)


def versions_body(view: dict[str, Any], form_token: str | None = None) -> str:
    """The Versions page; with ``form_token`` (a signed-in session of a dashboard holding the signing
    key) approve and roll back are buttons, otherwise the page gives the commands to run."""
    champion = view["champion"] or {}
    parts = [
        f"<p>registry {text(view['path'])}; champion <strong id=champion>{text(champion.get('version'))}</strong> "
        f"since {text(champion.get('set_at'))} ({text(champion.get('reason'))}), as champion.json says. "
        "Check the signed chain with:</p>",
        command(view["commands"]["verify"]),
        "<h2>Awaiting approval</h2>",
    ]
    pending = [row for row in view["versions"] if row["status"] == "pending"]
    base = f"/versions/{view['registry_id']}"
    # The champion this page showed: an action refuses if it has moved since (a CLI approval meanwhile).
    shown = {"champion": str(champion.get("version"))}
    for row in pending:
        version = row["version"]
        if form_token is None:
            parts.append(f"<p>version {version}:</p>{command(row['commands']['approve'])}")
        else:
            label = f"approve version {version}"
            parts.append(form(f"{base}/approve/{version}", form_token, label, f"approve-{version}", signs=shown))
    parts += [] if pending else ['<p class="none">none</p>']
    if form_token is not None:
        backs = [row["version"] for row in view["versions"] if "rollback" in row["commands"]]
        parts.append("<h2>Roll back</h2>")
        for v in backs:
            label, why = f"roll back to version {v}", f"back to version {v}"
            parts.append(form(f"{base}/rollback/{v}", form_token, label, f"rollback-{v}", reason=why, signs=shown))
        parts += [] if backs else ['<p class="none">no version to roll back to</p>']
    parts += ["<h2>Versions</h2>", table(_VERSION_HEADERS, [_version_row(r) for r in view["versions"]])]
    timeline = [[text(e["at"]), text(e["event"]), text(e["version"]), text(e["detail"])] for e in view["timeline"]]
    parts += ["<h2>Timeline (newest first)</h2>", table(["at", "event", "version", "detail"], timeline)]
    decisions = [
        [
            link("cycles", d["dashboard_run"], d.get("name")) if d.get("dashboard_run") else text(d.get("run_id")),
            text(d.get("decision")),
            text(d.get("version")),
            text(d.get("baseline_version")),
            f"{num(d.get('improvement'))} [{num(d.get('ci_low'))}, {num(d.get('ci_high'))}]",
            text("; ".join(d.get("reasons") or [])),
        ]
        for d in view["decisions"]
    ]
    headers = ["run", "decision", "version", "baseline", "improvement [interval]", "reasons"]
    parts += [
        "<h2>Gate and rollout decisions (newest first)</h2>",
        table(headers, decisions),
        problems(view["problems"]),
    ]
    return "".join(parts)


_VERSION_HEADERS = ["version", "status", "created", "expires", "parent", "run", "gate", "improvement [interval]"]
_VERSION_HEADERS += ["trained by (pseudonym: ε)", "installed at", "approval", "student", "commands"]


def _version_row(row: dict[str, Any]) -> list[str]:
    manifest = row["manifest"] or {}
    gate, run, approval = manifest.get("gate") or {}, manifest.get("run") or {}, row["approval"] or {}
    status = text(row["status"]) + (" (expired)" if row["expired"] else "")
    if row["status"] in ("pending", "champion"):
        status = f'<span class="{row["status"]}">{status}</span>'
    return [
        text(row["version"]),
        status,
        text(manifest.get("created_at")),
        text(manifest.get("expires_at")),
        text(manifest.get("parent")),
        text(run.get("name")),
        text(gate.get("decision")),
        f"{num(gate.get('improvement'))} [{num(gate.get('ci_low'))}, {num(gate.get('ci_high'))}]",
        _trained_by(manifest.get("sites")),
        text(", ".join(sorted(row["installed"])) or None),
        text(f"{approval.get('approver')} at {approval.get('created_at')}" if approval else None),
        _student_cell(row.get("student")),
        "".join(command(c) for name, c in row["commands"].items() if name != "show"),
    ]


def _student_cell(student: dict[str, Any] | None) -> str:
    """A version's distilled student: its layers, size and held-out loss against its teacher."""
    if not student:
        return text(None)
    arch, gate = student.get("architecture") or {}, student.get("gate") or {}
    share = arch.get("parameters", 0) / arch["teacher_parameters"] if arch.get("teacher_parameters") else None
    return text(
        f"{arch.get('layers')} of {arch.get('teacher_layers')} layers, "
        + (f"{share:.0%} of the parameters, " if share is not None else "")
        + f"held-out loss {num(gate.get('gap'))} nats from its teacher's"
    )


def login_body(target: str, *, wrong: bool = False) -> str:
    """The sign-in form: the token the dashboard printed at its start, or the one in its --token-file."""
    said = '<p class="problems">wrong token</p>' if wrong else ""
    return (
        f"{said}<p>This dashboard needs a login: the token it printed when it started, or the one in its "
        "--token-file.</p>"
        '<form class="act" method="post" action="/login">'
        f'<input type="hidden" name="next" value="{text(target)}">'
        'token <input type="password" name="token" id="token" autocomplete="current-password" autofocus> '
        '<button type="submit" id="sign-in">sign in</button></form>'
    )


def alerts_body(view: dict[str, Any]) -> str:
    """The watch's alerts and the cycles it ran, per federation, then every cycle's outcome."""
    parts = []
    for fed in view["federations"]:
        registry = fed["registry"] or {}
        parts.append(f"<h2>Watch of {text(registry.get('path'))}</h2>{_watch(fed['watch'])}")
    parts += [] if parts else ['<p class="none">no watch has run on these registries</p>']
    parts += ["<h2>Every cycle's outcome (newest first)</h2>", cycles_body(view["cycles"])]
    return "".join(parts)


def resources_body(view: dict[str, Any]) -> str:
    m = view["machine"]
    gib = 2.0**30
    disks = ", ".join(
        f"{text(d['path'])}: {d['free_bytes'] / gib:.1f} of {d['total_bytes'] / gib:.1f} GiB free" for d in m["disks"]
    )
    parts = [
        "<h2>Coordinator machine (now)</h2>",
        f'<p>CPU <span id="cpu">{num(m["cpu_percent"], 1)}</span> % of {text(m["cpus"])} cores '
        f"(load {', '.join(f'{x:.2f}' for x in m['load_average'])}); memory "
        f'<span id="memory">{m["memory_used_bytes"] / gib:.1f}</span> of {m["memory_total_bytes"] / gib:.1f} GiB; '
        f"this dashboard {m['dashboard_rss_bytes'] / 2**20:.0f} MiB; disk {disks or '–'}</p>",
        "<h2>Anomalies</h2>",
        table(
            ["run", "what", "round", "detail"],
            [
                [link("cycles", a["run_id"]), text(a["kind"]), text(a["round"]), text(a["detail"])]
                for a in view["anomalies"]
            ],
        ),
        "<h2>Rounds</h2>",
        "<p>Seconds and bytes per round as the coordinator measured them. A site's step time and peak memory "
        "stay at the site: under DP-SGD they grow with the batch Poisson sampling drew from its records.</p>",
    ]
    for run in view["runs"]:
        series = {"seconds": [(r["round"], r["round_s"]) for r in run["rounds"] if r["round"] > 0]}
        parts.append(f"<h3>{link('cycles', run['run_id'], run['name'] or run['run_id'])}</h3>")
        parts.append(line_chart(f"Seconds per round (median {num(run['median_round_s'], 2)} s)", series))
    return "".join(parts)


def _trained_by(sites: Any) -> str:
    """The manifest's sites: the registry's pseudonyms, each with the lifetime ε it reported."""
    if not isinstance(sites, dict) or not sites:
        return "–"
    return "<br>".join(
        f"{text(name)}: {num((figures or {}).get('epsilon'), 2)}" for name, figures in sorted(sites.items())
    )
