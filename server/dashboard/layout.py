"""The page shell: navigation, style, the polling script, and the headers every response carries.

Live updates: the page's script asks the page's JSON endpoint every few seconds; when the
answer changes, it fetches the page again and swaps its ``<main>``. The style and the script
are inline and named by their hashes in the Content-Security-Policy, which allows nothing
else: no other script, no style attribute, nothing from another origin.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #111; }
header { background: #1f2937; color: #fff; padding: 8px 16px; display: flex; gap: 18px; align-items: baseline; }
header a { color: #cbd5e1; text-decoration: none; } header a.active { color: #fff; font-weight: 600; }
header .note { font-size: 12px; color: #9ca3af; } header #who { margin-left: auto; }
header form, main form { display: inline; margin: 0; } button { font: inherit; cursor: pointer; }
form.act { display: block; margin: 4px 0 10px; } form.act input[type=text] { width: 28em; }
main { padding: 8px 16px 32px; }
table { border-collapse: collapse; margin: 6px 0 14px; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } td:first-child { white-space: nowrap; }
pre.cmd { background: #f3f4f6; padding: 4px 8px; margin: 2px 0; white-space: pre-wrap; word-break: break-all; }
.problems { color: #b91c1c; } .none { color: #6b7280; }
.pending { background: #fef3c7; } .champion { background: #dcfce7; }
figure.chart { display: inline-block; margin: 0 18px 12px 0; vertical-align: top; }
figcaption { font-weight: 600; } ul.legend { list-style: none; padding: 0; margin: 0; font-size: 12px; }
"""

SCRIPT = """
(() => {
  if (!document.body.dataset.poll) return;  // an error page: nothing to follow
  const every = Number(document.body.dataset.every);
  const note = document.getElementById("live-note");
  let last = null;
  async function tick() {
    try {
      const reply = await fetch(document.body.dataset.poll, {cache: "no-store"});
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      const text = await reply.text();
      if (last !== null && text !== last) {
        const page = await fetch(location.href, {cache: "no-store"});
        const doc = new DOMParser().parseFromString(await page.text(), "text/html");
        const fresh = doc.getElementById("live");
        if (fresh) document.getElementById("live").replaceWith(fresh);
      }
      last = text;
      note.textContent = "live: checked " + new Date().toLocaleTimeString();
    } catch (err) {
      note.textContent = "not updating: " + err.message;
    }
    setTimeout(tick, every);
  }
  tick();
  // The exchange's deadline counts down between polls.
  setInterval(() => {
    const left = document.getElementById("time-left");
    if (left) left.textContent = Math.max(0, Math.round(Number(left.dataset.deadline) - Date.now() / 1000));
  }, 1000);
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_hash(SCRIPT)}; style-src {_hash(STYLE)}; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PAGES = (
    ("federation", "/federation", "Federation"),
    ("cycles", "/cycles", "Cycles"),
    ("versions", "/versions", "Versions"),
    ("alerts", "/alerts", "Alerts"),
    ("resources", "/resources", "Resources"),
)


def page(title: str, active: str, body: str, *, poll: str, poll_s: float, who: str = "read-only") -> str:
    """A whole HTML page whose ``<main>`` is ``body``, refreshed when ``poll`` (a JSON URL) changes;
    ``who`` (HTML) says in the header what this browser may do."""
    nav = "".join(
        f'<a href="{href}"{" class=active" if name == active else ""}>{label}</a>' for name, href, label in PAGES
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} - fedretrain</title>'
        f"<style>{STYLE}</style></head>"
        f'<body data-poll="{escape(poll)}" data-every="{int(poll_s * 1000)}">'
        f'<header><strong>fedretrain</strong>{nav}<span class="note" id="who">{who}</span>'
        '<span class="note" id="live-note"></span></header>'
        f'<main id="live"><h1>{escape(title)}</h1>{body}</main><script>{SCRIPT}</script></body></html>'
    )


def text(value: Any) -> str:
    """A value as escaped text; None as a dash."""
    return "–" if value is None else escape(str(value))


def num(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals (ints as they are); anything else as :func:`text`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return text(value)
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table of cells already escaped; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>" if body else '<p class="none">none</p>'


def link(kind: str, ident: str, label: str | None = None) -> str:
    """A link to a run's Cycle page (``kind="cycles"``) or a registry's Versions page (``"versions"``)."""
    return f'<a href="/{kind}/{quote(ident, safe="")}">{text(label or ident)}</a>'


def command(line: str) -> str:
    """A command for the operator to copy."""
    return f'<pre class="cmd"><code>{escape(line)}</code></pre>'


def problems(lines: Sequence[str]) -> str:
    """What could not be read, said on the page rather than hidden."""
    if not lines:
        return ""
    return '<ul class="problems">' + "".join(f"<li>{escape(p)}</li>" for p in lines) + "</ul>"


def form(
    action: str,
    form_token: str,
    label: str,
    element_id: str,
    *,
    reason: str | None = None,
    signs: dict[str, str] | None = None,
) -> str:
    """A POST form to ``action`` carrying the session's form token; with a reason field when
    ``reason`` is given; ``signs`` (hidden fields): an action signed with the coordinator's key,
    which asks for the login token again."""
    fields = ""
    if reason is not None:
        fields += f' reason <input type="text" name="reason" maxlength="200" value="{escape(reason)}">'
    if signs is not None:
        fields += "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in signs.items())
        fields += ' token <input type="password" name="token" autocomplete="current-password" required>'
    return (
        f'<form class="act" method="post" action="{escape(action)}">'
        f'<input type="hidden" name="form-token" value="{escape(form_token)}">'
        f'<button type="submit" id="{escape(element_id)}">{escape(label)}</button>{fields}</form>'
    )
