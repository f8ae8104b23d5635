"""The HTTP forecast edge, with a real HTTP client (urllib) against a server on 127.0.0.1 started by the test:
forecasts read through the shards, and every error in its documented format."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import polars as pl
import pytest

from gdn2ts.distributed import ShardedRunner, ShardedView
from gdn2ts.distributed.serve import ForecastServer

from fleet_data import batches, spec


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with ShardedRunner(spec(), tmp_path_factory.mktemp("fleet"), shards=2, partitions=4, local=True) as fleet:
        for b in batches():
            fleet.observe(b)
        yield fleet


def request(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        assert e.headers["Content-Type"].startswith("application/json")
        return e.code, json.loads(e.read())


def test_forecasts_over_http_equal_the_fleets(fleet):
    with ForecastServer(fleet) as server:
        status, doc = request(f"{server.url}/forecast", json.dumps({"streams": ["s7", "s2"]}).encode())
        assert status == 200
        got = pl.DataFrame(doc["forecasts"])
        expected = fleet.forecast(["s7", "s2"])
        assert got["stream"].unique(maintain_order=True).to_list() == ["s7", "s2"]
        for column in ("stream", "step", "channel", "origin", "target_time", "q0.1", "q0.5", "q0.9"):
            assert got[column].to_list() == expected[column].to_list()
        status, again = request(f"{server.url}/forecast?stream=s7&stream=s2")
        assert status == 200 and again == doc
        assert request(f"{server.url}/health") == (200, {"status": "ok", "shards": 2, "partitions": 4})


@pytest.mark.parametrize(("body", "query", "method", "status", "code", "says"), [
    (b"{not json", None, None, 400, "bad_request", "not JSON"),
    (json.dumps({"streams": "s1"}).encode(), None, None, 400, "bad_request", "non-empty list"),
    (json.dumps({"streams": []}).encode(), None, None, 400, "bad_request", "non-empty list"),
    (json.dumps({"streams": ["s1", 7]}).encode(), None, None, 400, "bad_request", "strings"),
    (json.dumps({"streams": ["s1", "s2", "s3", "s4"]}).encode(), None, None, 400, "bad_request", "at most 3"),
    (None, "/forecast", None, 400, "bad_request", "non-empty list"),
    (json.dumps({"streams": ["s1", "nobody"]}).encode(), None, None, 404, "unknown_stream", "'nobody'"),
    (None, "/forecast?stream=nobody", None, 404, "unknown_stream", "'nobody'"),
    (b"{}", "/forecast", "PUT", 405, "method_not_allowed", "GET, POST"),
    (None, "/forecasts", None, 404, "not_found", "/forecasts"),
])
def test_errors_have_a_status_a_code_and_a_message(fleet, body, query, method, status, code, says):
    with ForecastServer(fleet, max_streams=3) as server:
        got, doc = request(server.url + (query or "/forecast"), body, method)
    assert got == status
    assert doc["error"]["code"] == code and says in doc["error"]["message"]


def test_a_read_only_view_serves_beside_the_writers(tmp_path):
    """Forecasts served from read-only views of the partitions while their shards hold them and keep writing."""
    parts = batches()
    with ShardedRunner(spec(), tmp_path, shards=2, partitions=4, local=True) as fleet:
        view = ShardedView(spec(), tmp_path)
        with ForecastServer(view) as server:
            for b in parts[:3]:
                fleet.observe(b)
                status, doc = request(f"{server.url}/forecast?stream=s7&stream=s2")
                assert status == 200
                expected = fleet.forecast(["s7", "s2"])
                assert pl.DataFrame(doc["forecasts"])["q0.5"].to_list() == expected["q0.5"].to_list()
            assert request(f"{server.url}/health") == (200, {"status": "ok", "shards": 2, "partitions": 4})


def test_a_fleet_that_does_not_answer_in_time_is_unavailable(fleet):
    class Stuck:
        def forecast(self, ids):
            time.sleep(1.0)
            return fleet.forecast(ids)

    with ForecastServer(Stuck(), timeout=0.2) as server:
        status, doc = request(f"{server.url}/forecast?stream=s1")
    assert status == 503 and doc["error"]["code"] == "unavailable"
