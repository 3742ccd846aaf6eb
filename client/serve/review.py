"""The review queue in the site's own service: a page and two JSON endpoints (client/review.py's queue).

``fedretrain site serve`` answers on 127.0.0.1 at the site, so the queue stays there: this is
the place for reviewers who would rather click than type ``fedretrain site review``. The
coordinator's dashboard never shows it (the records never leave the site).

``GET /review``       the page: the records waiting, the installed version's least sure first,
                      each with accept, reject, and correct (the text edited in place)
``GET /v1/review``    ``{"site_id", "version", "waiting", "records": [{"id", "loss", "text"}]}``
                      (``?limit=``, default 50, at most 500)
``POST /v1/review``   ``{"id", "decision": "accept" | "reject" | "correct", "by", "text"?}``:
                      the same calls as the CLI (a correction goes through the site's ingestion)

The page posts JSON with ``fetch``: a page of another origin cannot (the service takes only
``application/json``, which a browser sends cross-origin only after a preflight this service
never answers), and the record texts are set as text, never as HTML.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from client.review import UnknownRecord, as_rows, correct, decide, pending
from client.serve.app import ServedModel, ServiceError, _installed, _json
from fedretrain.config import SiteConfig
from fedretrain.errors import ConfigError, DataValidationError

MAX_LIMIT = 500
MAX_NAME = 100


def add_review_routes(app: FastAPI, site: SiteConfig, served: ServedModel) -> None:
    """Add the page and the endpoints to the site's service ``app``; ``served`` is its model (the
    scores come from the version it answers with)."""

    @app.get("/v1/review")
    async def queue(limit: int = 50) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIMIT:
            raise ServiceError(400, f"limit must be in [1, {MAX_LIMIT}], got {limit}", param="limit")
        installed = await run_in_threadpool(_installed, served)
        records = await run_in_threadpool(pending, site)
        losses = await run_in_threadpool(served.losses, [r.text for r in records]) if records else []
        rows = as_rows(records, losses)[:limit]
        return {"site_id": site.site_id, "version": installed.version, "waiting": len(records), "records": rows}

    @app.post("/v1/review")
    async def review(request: Request) -> dict[str, Any]:
        body = await _json(request)
        record_id, decision, by, text = (body.get(k) for k in ("id", "decision", "by", "text"))
        if not isinstance(record_id, str) or not record_id:
            raise ServiceError(400, "id must name a training record", param="id")
        if decision not in ("accept", "reject", "correct"):
            raise ServiceError(400, "decision must be accept, reject or correct", param="decision")
        if not isinstance(by, str) or not by.strip() or len(by) > MAX_NAME:
            raise ServiceError(400, f"by must name the reviewer (at most {MAX_NAME} characters)", param="by")
        if decision == "correct" and (not isinstance(text, str) or not text.strip()):
            raise ServiceError(400, "a correction needs the corrected text", param="text")
        try:
            if decision == "correct":
                entry = await run_in_threadpool(correct, site, record_id, str(text), by=by.strip())
            else:
                (entry,) = await run_in_threadpool(decide, site, [record_id], decision, by=by.strip())
        except UnknownRecord as err:
            raise ServiceError(404, str(err), param="id") from None
        except DataValidationError as err:
            raise ServiceError(400, f"correction refused: {err.reason}", param="text") from None
        except ConfigError as err:
            raise ServiceError(400, str(err), param=None) from None
        return {"recorded": entry}

    @app.get("/review", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{site}", site.site_id)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review queue: site {site}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}
.rec{border:1px solid #ccc;border-radius:6px;padding:.8rem;margin:.8rem 0}
.meta{color:#555;font-size:.9rem}
textarea{width:100%;min-height:5rem;font-family:inherit}
button{margin-right:.4rem}
#status{color:#055}
.error{color:#a00}
</style></head>
<body>
<h1>Review queue: site {site}</h1>
<p>The training records nobody at this site has reviewed, the installed version's least sure first.
They stay at this site. With <code>train.require_review=true</code> only accepted or corrected
records are trained on.</p>
<label>Reviewer <input id="by" autocomplete="username"></label>
<p id="status"></p>
<div id="records"></div>
<script>
const statusLine = document.getElementById("status");
function say(text, bad) { statusLine.textContent = text; statusLine.className = bad ? "error" : ""; }
async function load() {
  const reply = await fetch("/v1/review");
  const body = await reply.json();
  if (!reply.ok) { say(body.error.message, true); return; }
  say(body.waiting + " record(s) wait for review; the installed version is " + body.version);
  const list = document.getElementById("records");
  list.replaceChildren();
  for (const rec of body.records) {
    const box = document.createElement("div"); box.className = "rec"; box.dataset.id = rec.id;
    const meta = document.createElement("div"); meta.className = "meta";
    meta.textContent = rec.id + " \\u2014 loss " + rec.loss.toFixed(3) + " nats";
    const text = document.createElement("textarea"); text.value = rec.text;
    box.append(meta, text);
    for (const decision of ["accept", "reject", "correct"]) {
      const button = document.createElement("button"); button.textContent = decision;
      button.dataset.decision = decision;
      button.onclick = () => send(rec.id, decision, text.value);
      box.append(button);
    }
    list.append(box);
  }
}
async function send(id, decision, text) {
  const by = document.getElementById("by").value;
  const body = {id: id, decision: decision, by: by};
  if (decision === "correct") body.text = text;
  const reply = await fetch("/v1/review", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
  const answer = await reply.json();
  if (!reply.ok) { say(answer.error.message, true); return; }
  await load();
  say(id + ": " + decision + (decision === "correct" ? "ed (" + answer.recorded.id + " accepted)" : "ed"));
}
load();
</script>
</body></html>
"""
