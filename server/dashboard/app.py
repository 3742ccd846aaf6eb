"""The dashboard's routes: a JSON endpoint per page, and the page rendered from the same data.

Reading is GET only. An id in a URL must match its pattern (400 otherwise) and name something
the catalogue found by listing (404 otherwise). On a loopback address a request whose
``Host`` is not a loopback name is refused (400): a web page elsewhere cannot point a name of
its own at 127.0.0.1 and read the dashboard through the user's browser (DNS rebinding).

The only writes are approve and rollback (POST), through :class:`fedretrain.registry.store.Registry`
as ``fedretrain registry`` does them, and only as :mod:`~server.dashboard.access` allows: a
dashboard started with the signing key, a signed-in session, its form token, its own origin.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import parse_qs, quote

import psutil
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedretrain.errors import RegistryError
from fedretrain.registry.store import Registry
from fedretrain.web import loopback_host
from server.dashboard import pages
from server.dashboard.access import COOKIE, SESSION_S, Access
from server.dashboard.catalogue import REGISTRY_ID, RUN_ID, Catalogue, RegistryDir, RunDir
from server.dashboard.cycles import cycle_list, cycle_view
from server.dashboard.federation import alerts_view, federation_view
from server.dashboard.layout import SECURITY_HEADERS, form, page
from server.dashboard.resources import resources_view
from server.dashboard.versions import registry_list, version_detail, versions_view

VERSION = re.compile(r"[0-9]{1,9}")
OPEN_PATHS = frozenset({"/login"})  # what a browser without a session may ask for
MAX_FORM = 4096  # bytes: a login or an action form is a few fields


def create_app(
    catalogue: Catalogue, *, poll_s: float = 5.0, access: Access | None = None, loopback: bool = True
) -> FastAPI:
    """The dashboard over ``catalogue``; pages ask their JSON endpoint every ``poll_s`` seconds.
    ``access``: login and signing rights (none: read-only, no login); ``loopback``: it listens on
    a loopback address, so a request must name one as its Host."""
    access = access or Access()
    failed_logins = asyncio.Lock()
    psutil.cpu_percent(interval=None)  # primes it: the Resources page shows the use since the last call
    # No /docs or /openapi.json: FastAPI's docs page loads its script from a CDN.
    app = FastAPI(title="fedretrain dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if loopback and not loopback_host(request.headers.get("host", "")):
            return PlainTextResponse("the dashboard answers only to 127.0.0.1, ::1 or localhost", status_code=400)
        path = request.url.path
        if access.login_required and path not in OPEN_PATHS and _form_token(request, access) is None:
            if request.method == "GET" and not path.startswith("/api/"):
                response: Response = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
            else:
                response = PlainTextResponse("sign in first: /login", status_code=401)
        elif request.method == "POST" and not _same_origin(request):
            response = PlainTextResponse("refused: the request does not come from this dashboard's page", 403)
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        # The JSON endpoints answer {"detail": ...} as FastAPI does; a page in a browser, a page.
        if request.url.path.startswith("/api/"):
            return await http_exception_handler(request, exc)
        body = f'<p class="problems">{escape(str(exc.detail))}</p><p><a href="/federation">the federation</a></p>'
        html_page = page(f"{exc.status_code}: not done", "", body, poll="", poll_s=0, who=_who(request, access))
        return HTMLResponse(html_page, status_code=exc.status_code, headers=exc.headers)

    def html(request: Request, title: str, active: str, body: str, poll: str) -> HTMLResponse:
        return HTMLResponse(page(title, active, body, poll=poll, poll_s=poll_s, who=_who(request, access)))

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/federation")

    @app.get("/login")
    def login_page(request: Request, next: str = "/federation") -> Response:
        if not access.login_required:
            return RedirectResponse("/federation", status_code=303)
        return HTMLResponse(page("Sign in", "", pages.login_body(_next(next)), poll="", poll_s=0, who=""))

    @app.post("/login")
    async def login(request: Request) -> Response:
        fields = await _form(request)
        target = _next(fields.get("next", "/federation"))
        session = access.login(fields.get("token", ""))
        if session is None:
            async with failed_logins:  # one wrong guess a second for the whole process, however many connections
                await asyncio.sleep(1.0)
            body = pages.login_body(target, wrong=True)
            return HTMLResponse(page("Sign in", "", body, poll="", poll_s=0, who=""), status_code=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE, session, max_age=SESSION_S, path="/", secure=access.tls, httponly=True, samesite="strict"
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        access.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/api/federation")
    def federation_data() -> JSONResponse:
        return JSONResponse(federation_view(catalogue))

    @app.get("/federation")
    def federation_page(request: Request) -> HTMLResponse:
        body = pages.federation_body(federation_view(catalogue))
        return html(request, "Federation", "federation", body, "/api/federation")

    @app.get("/api/alerts")
    def alerts_data() -> JSONResponse:
        return JSONResponse(alerts_view(catalogue))

    @app.get("/alerts")
    def alerts_page(request: Request) -> HTMLResponse:
        return html(request, "Alerts and cycles", "alerts", pages.alerts_body(alerts_view(catalogue)), "/api/alerts")

    @app.get("/api/resources")
    def resources_data() -> JSONResponse:
        return JSONResponse(resources_view(catalogue))

    @app.get("/resources")
    def resources_page(request: Request) -> HTMLResponse:
        # Polls the run list, not the machine: CPU figures change every second and would
        # redraw the page on every poll.
        body = pages.resources_body(resources_view(catalogue))
        return html(request, "Resources", "resources", body, "/api/cycles")

    @app.get("/api/cycles")
    def cycles_data() -> JSONResponse:
        return JSONResponse(cycle_list(catalogue))

    @app.get("/cycles")
    def cycles_page(request: Request) -> HTMLResponse:
        return html(request, "Cycles", "cycles", pages.cycles_body(cycle_list(catalogue)), "/api/cycles")

    @app.get("/api/cycles/{run_id}")
    def cycle_data(run_id: str) -> JSONResponse:
        return JSONResponse(cycle_view(_run(catalogue, run_id)))

    @app.get("/cycles/{run_id}")
    def cycle_page(request: Request, run_id: str) -> HTMLResponse:
        view = cycle_view(_run(catalogue, run_id))
        return html(request, f"Cycle {run_id}", "cycles", pages.cycle_body(view), f"/api/cycles/{run_id}")

    @app.get("/api/registries")
    def registries_data() -> JSONResponse:
        return JSONResponse(registry_list(catalogue))

    @app.get("/versions")
    def registries_page(request: Request) -> HTMLResponse:
        body = pages.registries_body(registry_list(catalogue))
        return html(request, "Registries", "versions", body, "/api/registries")

    @app.get("/api/registries/{registry_id}")
    def versions_data(registry_id: str) -> JSONResponse:
        return JSONResponse(versions_view(_registry(catalogue, registry_id), catalogue))

    @app.get("/versions/{registry_id}")
    def versions_page(request: Request, registry_id: str) -> HTMLResponse:
        view = versions_view(_registry(catalogue, registry_id), catalogue)
        token = _form_token(request, access) if access.can_sign else None
        body = pages.versions_body(view, token)
        return html(request, "Versions", "versions", body, f"/api/registries/{registry_id}")

    @app.get("/api/registries/{registry_id}/versions/{version}")
    def version_data(registry_id: str, version: str) -> JSONResponse:
        registry = _registry(catalogue, registry_id)
        detail = version_detail(registry, int(_valid(VERSION, version, "version")))
        if detail is None:
            raise HTTPException(404, f"no version {version} in this registry")
        return JSONResponse(detail)

    @app.post("/versions/{registry_id}/{action}/{version}")
    async def act(request: Request, registry_id: str, action: str, version: str) -> Response:
        if action not in ("approve", "rollback"):
            raise HTTPException(404, f"no action {action[:40]!r}: approve or rollback")
        registry = _registry(catalogue, registry_id)
        number = int(_valid(VERSION, version, "version"))
        if access.signing_key is None:
            view = versions_view(registry, catalogue)
            row = next((r for r in view["versions"] if r["version"] == number), None)
            run = (row or {}).get("commands", {}).get(action)
            how = f"run: {run}" if run else f"version {number} cannot be {action}d now: see its status on this page"
            raise HTTPException(
                403,
                f"this dashboard was started without the coordinator's signing key (--signing-key), so it "
                f"does not {action}; {how}",
            )
        fields = await _form(request)
        if not access.valid_form(request.cookies.get(COOKIE), fields.get("form-token", "")):
            raise HTTPException(403, "the form is stale or not this session's: reload the page and try again")
        # On loopback a cookie reaches every port of 127.0.0.1 (another local user's server
        # too): signing with the coordinator's key takes the login token itself.
        if not access.token_matches(fields.get("token", "")):
            raise HTTPException(403, f"{action}: the login token is wrong; nothing was signed")
        key, reg = access.signing_key, Registry(registry.path)
        if fields.get("champion") != str(reg.champion()):
            raise HTTPException(
                409,
                f"the champion is now version {reg.champion()}, not the {fields.get('champion')} this page showed: "
                "reload the page and decide again",
            )
        try:
            if action == "approve":
                await run_in_threadpool(reg.approve, number, signing_key=key, approver=f"{access.approver} (dashboard)")
            else:
                reason = fields.get("reason", "").strip()[:200] or "rolled back from the dashboard"
                await run_in_threadpool(reg.rollback, number, signing_key=key, reason=reason)
        except RegistryError as err:
            raise HTTPException(409, f"{action} of version {number} refused: {err}") from None
        return RedirectResponse(f"/versions/{registry_id}", status_code=303)

    return app


def _form_token(request: Request, access: Access) -> str | None:
    return access.form_token(request.cookies.get(COOKIE))


def _who(request: Request, access: Access) -> str:
    """The header's note: what this browser may do here, and a sign-out button when signed in."""
    token = _form_token(request, access)
    if token is None:
        return "read-only"
    rights = f"signed in; approves as {escape(access.approver)}" if access.can_sign else "signed in; read-only"
    return f"{rights} " + form("/logout", token, "sign out", "logout").replace('class="act" ', "")


def _same_origin(request: Request) -> bool:
    # A browser names the page a POST comes from; a form elsewhere is refused even with the cookie
    # (which SameSite=Strict already keeps off cross-site requests). Tools that send no Origin
    # still need the session's form token.
    if request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (first value each); 400 if it is too long or not such a form."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        raise HTTPException(400, "expected a form (application/x-www-form-urlencoded)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FORM:
        raise HTTPException(413, f"form larger than {MAX_FORM} bytes")
    body = b""
    async for chunk in request.stream():  # read no further than the cap, whatever the headers said
        body += chunk
        if len(body) > MAX_FORM:
            raise HTTPException(413, f"form larger than {MAX_FORM} bytes")
    try:
        parsed = parse_qs(body.decode(), max_num_fields=8, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as err:
        raise HTTPException(400, f"malformed form: {err}") from None
    return {key: values[0] for key, values in parsed.items()}


def _next(target: str) -> str:
    """Where to go after signing in: a path on this dashboard, never another site."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/federation"


def _run(catalogue: Catalogue, run_id: str) -> RunDir:
    run = catalogue.run(_valid(RUN_ID, run_id, "run id"))
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return run


def _registry(catalogue: Catalogue, registry_id: str) -> RegistryDir:
    registry = catalogue.registry(_valid(REGISTRY_ID, registry_id, "registry id"))
    if registry is None:
        raise HTTPException(404, f"no registry {registry_id!r}")
    return registry


def _valid(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise HTTPException(400, f"malformed {what}: {value[:80]!r}")
    return value
