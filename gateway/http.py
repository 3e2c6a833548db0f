"""`gateway.http`: Prometheus `/metrics`, `/healthz` and a read-only status page, served on the gateway's loop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from gateway.config.addresses import split_listen
from gateway.errors import FieldgateError
from gateway.health import HEALTH_PARTS, problems
from gateway.prometheus import GatewayCollector
from gateway.snapshot import LINES, SnapshotSource
from gateway.status_page import StatusPage
from gateway.supervise import Supervised, Supervisor
from gateway.utilisation import Utilisation

log = logging.getLogger(__name__)

UTILISATION_SAMPLE = 5.0  # how often the lines' wire time is sampled for their utilisation
SHUTDOWN_TIMEOUT = 1.0  # a scrape in progress at stop gets this long


class HttpServer:
    """The gateway's HTTP listener: `/metrics` (Prometheus), `/healthz` and `/` (status page)."""

    def __init__(self, snapshot: SnapshotSource, listen: str, supervisor: Supervisor) -> None:
        self.snapshot = snapshot
        self.listen = listen
        self.port = 0
        self.utilisation = Utilisation()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(snapshot, self.utilisation))
        ProcessCollector(registry=self.registry)  # RSS, CPU, open fds: what a Pi runs short of
        self._supervisor = supervisor
        self._runner: web.AppRunner | None = None
        self._sampler: Supervised | None = None

    async def start(self) -> None:
        """Bind and serve; FieldgateError with the address and the reason when it cannot bind."""
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        # No access log: a scrape every 15 s would fill the journal with nothing.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        host, port = split_listen(self.listen)  # an empty host: None, every interface to aiohttp
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise FieldgateError(f"status page cannot listen on {self.listen} (gateway.http): {exc}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._sample()
        self._sampler = self._supervisor.spawn("http:utilisation", self._sample_loop)
        log.info("status page on http://%s:%d/ (metrics at /metrics)", host or "0.0.0.0", self.port)

    async def stop(self) -> None:
        """Stop listening; a request in progress gets a moment to finish."""
        if self._sampler is not None:
            await self._supervisor.stop(self._sampler)
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sample_loop(self) -> None:
        while True:
            await asyncio.sleep(UTILISATION_SAMPLE)
            self._sample()

    def _sample(self) -> None:
        snapshot = self.snapshot((LINES,))
        snapshot.require(LINES)
        self.utilisation.sample(snapshot.lines, snapshot.taken_at)

    # --- handlers -----------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        # That this handler runs at all shows the event loop answers; the rest is what can die quietly.
        found = problems(self.snapshot(HEALTH_PARTS))
        if found:
            return web.Response(status=503, text="\n".join(found) + "\n")
        return web.Response(text="ok\n")

    async def _page(self, request: web.Request) -> web.Response:
        snapshot = self.snapshot()
        page = StatusPage(snapshot, self.utilisation, problems(snapshot)).render()
        # "replace": a string no encoder takes (a lone surrogate) costs one "?" on the page, not the page.
        return web.Response(body=page.encode("utf-8", "replace"), content_type="text/html", charset="utf-8")
