"""``fedretrain dashboard``: the federation, its cycles and its registry in a browser, read-only.

The files stay the one source of truth: run directories (``config.yaml``, ``metrics.jsonl``,
``summary.json``, ``ledgers/``), a deployment's coordinator folder (``runs/``, ``watch.json``,
``sites.json``), the registry and the watch's records below it. The dashboard reads them on
every request and writes nothing.

- :mod:`~server.dashboard.catalogue`  what exists: runs and registries found by listing, ids checked
- :mod:`~server.dashboard.federation` every site: ε spent against its ceiling, drift, the watch
- :mod:`~server.dashboard.cycles`     one cycle round by round, as metrics.jsonl and summary.json say
- :mod:`~server.dashboard.versions`   the registry as a timeline, with the CLI commands an operator runs
- :mod:`~server.dashboard.charts`     line charts and budget bars as inline SVG
- :mod:`~server.dashboard.layout`     the page shell: style, the polling script, the security headers
- :mod:`~server.dashboard.pages`      the HTML of each page, from the same data the JSON endpoints return
- :mod:`~server.dashboard.app`        the FastAPI routes
- :mod:`fedretrain.web`               loopback unless TLS, then uvicorn (shared with `fedretrain site serve`)
"""
