"""A driver killed with SIGKILL in the middle of its calls: its shards die with it (Ray's actors share their
owner's fate), a new driver opens the same stores (the leases free again, the journals replayed) and continues.
The producer numbers its batches, so the batch in flight is sent again with its number and applied once; the
result equals an uninterrupted run bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gdn2ts.distributed import ShardedRunner

from fleet_data import batches, ids, spec, states

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import ray
    from gdn2ts.distributed import ShardedRunner
    from fleet_data import batches, spec

    ray.init(address={address!r}, log_to_driver=False, configure_logging=False)
    with ShardedRunner(spec(), {root!r}, shards=2, partitions=4, pause=0.05) as fleet:
        for i, batch in enumerate(batches(calls={calls})):
            fleet.observe(batch, call=i + 1)
            with open({acks!r}, "a") as f:
                f.write(f"{{i + 1}}\\n")
""")


def test_a_new_driver_continues_after_the_driver_is_killed(tmp_path, ray_cluster):
    calls = 16
    parts = batches(calls=calls)
    root, acks = tmp_path / "fleet", tmp_path / "acks"
    code = CHILD.format(here=str(Path(__file__).parent), address=ray_cluster.get_runtime_context().gcs_address,
                        root=str(root), acks=str(acks), calls=calls)
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (acks.exists() and len(acks.read_text().split()) >= 3):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    acked = [int(n) for n in acks.read_text().split()]
    assert acked == list(range(1, len(acked) + 1)) and len(acked) < calls
    with ShardedRunner(spec(), root) as fleet:
        assert fleet.shards == 2 and fleet.call >= len(acked)
        # the batch in flight when the driver died, then the rest, each with its number
        results = [fleet.observe(parts[i], call=i + 1) for i in range(len(acked), calls)]
        # a batch sent again once it has been applied everywhere changes nothing
        assert fleet.observe(parts[0], call=1).duplicate == parts[0].height
        forecast = fleet.forecast(ids())
    with ShardedRunner(spec(), tmp_path / "reference", shards=1, partitions=4, local=True) as reference:
        expected = [reference.observe(b) for b in parts]
        assert forecast.equals(reference.forecast(ids()))
    assert states(root) == states(tmp_path / "reference")
    assert [r.accepted for r in results[1:]] == [r.accepted for r in expected[len(acked) + 1:]]
