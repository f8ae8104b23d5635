"""The serving edge: forecasts over HTTP for a set of stream ids, read through the shards (aiohttp).

Requests (JSON in and out, UTF-8):

* ``POST /forecast`` with ``{"streams": ["meter-7", "meter-9"]}``, or ``GET /forecast?stream=meter-7&stream=meter-9``:
  ``200`` with ``{"forecasts": [row, ...]}``, one row per (stream, step, channel) in the order asked, as
  :meth:`~gdn2ts.streaming.OnlineRunner.forecast` gives them: ``stream``, ``origin``, ``target_time``, ``step``,
  ``channel``, one key per quantile (``"q0.5"``), ``error`` (null, or why the stream's record cannot be used);
  timestamps as ISO-8601 text for date and date-time data, numbers otherwise.
* ``GET /health``: ``200`` with ``{"status": "ok", "shards": N, "partitions": P}``.

Errors: ``{"error": {"code": ..., "message": ...}}`` with status ``400`` (``bad_request``: a body that is not JSON,
``streams`` not a non-empty list of strings, more than ``max_streams`` ids), ``404`` (``unknown_stream``: the message
names the first unknown id; nothing is answered for the others), ``405`` (``method_not_allowed``), ``503``
(``unavailable``: a shard did not answer within the timeout) or ``500`` (``internal``).

A :class:`ForecastServer` runs the server in a thread of its own (its own event loop); the forecasts themselves are
computed by the fleet (``forecast(ids)``: a :class:`~gdn2ts.distributed.ShardedRunner`, or any runner) in a worker
thread, one request at a time.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

__all__ = ["ForecastServer", "make_app"]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def make_app(fleet, max_streams: int = 10_000, timeout: float = 60.0) -> web.Application:
    """The aiohttp application answering forecasts of ``fleet`` (see the module docstring)."""
    lock = asyncio.Lock()

    async def forecast(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError):
                return _error(400, "bad_request", "the body is not JSON: expected {\"streams\": [ids]}")
            streams = body.get("streams") if isinstance(body, dict) else None
        else:
            streams = request.query.getall("stream", [])
        if not isinstance(streams, list) or not streams or not all(isinstance(s, str) for s in streams):
            return _error(400, "bad_request", "expected 'streams': a non-empty list of stream ids (strings)")
        if len(streams) > max_streams:
            return _error(400, "bad_request", f"{len(streams)} streams asked, at most {max_streams} per request")
        try:
            async with lock:
                table = await asyncio.wait_for(asyncio.to_thread(fleet.forecast, streams), timeout)
        except KeyError as e:
            return _error(404, "unknown_stream", str(e.args[0]) if e.args else str(e))
        except (TimeoutError, asyncio.TimeoutError):
            return _error(503, "unavailable", f"the shards did not answer within {timeout:g} s")
        except ValueError as e:
            return _error(400, "bad_request", str(e))
        except Exception as e:  # anything else is the server's fault: said so, without a traceback
            return _error(500, "internal", f"{type(e).__name__}: {e}")
        return web.Response(text='{"forecasts": ' + table.write_json() + "}", content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "shards": getattr(fleet, "shards", 1),
                                  "partitions": getattr(fleet, "partitions", 1)})

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as e:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}: use "
                                                     f"{', '.join(sorted(e.allowed_methods))}")
        except web.HTTPNotFound:
            return _error(404, "not_found", f"no such path {request.path!r}: use /forecast or /health")

    app = web.Application(middlewares=[errors])
    app.router.add_route("POST", "/forecast", forecast)
    app.router.add_route("GET", "/forecast", forecast)
    app.router.add_route("GET", "/health", health)
    return app


class ForecastServer:
    """An HTTP server of ``fleet``'s forecasts on ``host:port`` (port 0: any free port; see ``.port``), in a thread.

    Example:
        >>> import json, urllib.request
        >>> class Fleet:
        ...     def forecast(self, ids):
        ...         import polars as pl
        ...         return pl.DataFrame({"stream": ids, "step": [1] * len(ids)})
        >>> with ForecastServer(Fleet()) as server:
        ...     with urllib.request.urlopen(f"{server.url}/forecast?stream=a") as reply:
        ...         json.loads(reply.read())
        {'forecasts': [{'stream': 'a', 'step': 1}]}
    """

    def __init__(self, fleet, host: str = "127.0.0.1", port: int = 0, max_streams: int = 10_000,
                 timeout: float = 60.0):
        self.app = make_app(fleet, max_streams, timeout)
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self.app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, host, port)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._thread = threading.Thread(target=self._loop.run_forever, name="gdn2ts-forecast-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> ForecastServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
