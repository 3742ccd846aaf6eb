"""The dashboard's routes: a JSON endpoint per page, and the page rendered from the same data.

Every route only reads (GET). An id in a URL must match its pattern (400 otherwise) and
name something the catalogue found by listing (404 otherwise). A request whose ``Host`` is
not a loopback name is refused (400): a web page elsewhere cannot point a name of its own
at 127.0.0.1 and read the dashboard through the user's browser (DNS rebinding).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.dashboard import pages
from server.dashboard.catalogue import REGISTRY_ID, RUN_ID, Catalogue, RegistryDir, RunDir
from server.dashboard.cycles import cycle_list, cycle_view
from server.dashboard.federation import federation_view
from server.dashboard.layout import SECURITY_HEADERS, page
from server.dashboard.versions import registry_list, version_detail, versions_view

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
VERSION = re.compile(r"[0-9]{1,9}")


def create_app(catalogue: Catalogue, *, poll_s: float = 5.0) -> FastAPI:
    """The dashboard over ``catalogue``; pages ask their JSON endpoint every ``poll_s`` seconds."""
    # No /docs or /openapi.json: FastAPI's docs page loads its script from a CDN.
    app = FastAPI(title="fedretrain dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if urlsplit("//" + request.headers.get("host", "")).hostname not in LOOPBACK_NAMES:
            return PlainTextResponse("the dashboard answers only to 127.0.0.1, ::1 or localhost", status_code=400)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        # The JSON endpoints answer {"detail": ...} as FastAPI does; a page in a browser, a page.
        if request.url.path.startswith("/api/"):
            return await http_exception_handler(request, exc)
        body = f'<p class="problems">{escape(str(exc.detail))}</p><p><a href="/federation">the federation</a></p>'
        html_page = page(f"{exc.status_code}: not shown", "", body, poll="", poll_s=0)
        return HTMLResponse(html_page, status_code=exc.status_code, headers=exc.headers)

    def html(title: str, active: str, body: str, poll: str) -> HTMLResponse:
        return HTMLResponse(page(title, active, body, poll=poll, poll_s=poll_s))

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/federation")

    @app.get("/api/federation")
    def federation_data() -> JSONResponse:
        return JSONResponse(federation_view(catalogue))

    @app.get("/federation")
    def federation_page() -> HTMLResponse:
        return html("Federation", "federation", pages.federation_body(federation_view(catalogue)), "/api/federation")

    @app.get("/api/cycles")
    def cycles_data() -> JSONResponse:
        return JSONResponse(cycle_list(catalogue))

    @app.get("/cycles")
    def cycles_page() -> HTMLResponse:
        return html("Cycles", "cycles", pages.cycles_body(cycle_list(catalogue)), "/api/cycles")

    @app.get("/api/cycles/{run_id}")
    def cycle_data(run_id: str) -> JSONResponse:
        return JSONResponse(cycle_view(_run(catalogue, run_id)))

    @app.get("/cycles/{run_id}")
    def cycle_page(run_id: str) -> HTMLResponse:
        view = cycle_view(_run(catalogue, run_id))
        return html(f"Cycle {run_id}", "cycles", pages.cycle_body(view), f"/api/cycles/{run_id}")

    @app.get("/api/registries")
    def registries_data() -> JSONResponse:
        return JSONResponse(registry_list(catalogue))

    @app.get("/versions")
    def registries_page() -> HTMLResponse:
        return html("Registries", "versions", pages.registries_body(registry_list(catalogue)), "/api/registries")

    @app.get("/api/registries/{registry_id}")
    def versions_data(registry_id: str) -> JSONResponse:
        return JSONResponse(versions_view(_registry(catalogue, registry_id), catalogue))

    @app.get("/versions/{registry_id}")
    def versions_page(registry_id: str) -> HTMLResponse:
        view = versions_view(_registry(catalogue, registry_id), catalogue)
        return html("Versions", "versions", pages.versions_body(view), f"/api/registries/{registry_id}")

    @app.get("/api/registries/{registry_id}/versions/{version}")
    def version_data(registry_id: str, version: str) -> JSONResponse:
        registry = _registry(catalogue, registry_id)
        detail = version_detail(registry, int(_valid(VERSION, version, "version")))
        if detail is None:
            raise HTTPException(404, f"no version {version} in this registry")
        return JSONResponse(detail)

    return app


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
