"""How the driver reaches its shards: in its own process (:class:`LocalShard`), or as Ray actors
(:class:`RayShard`) that Ray restarts when they die.

Both answer ``submit(method, *args)`` (start a call) and ``result(call)`` (its value, or its exception). A lost
shard (its actor died or is restarting) raises :class:`ShardLost`; the driver then waits until the shard answers
again (:meth:`RayShard.wait`) and sends the call once more. Ray itself retries nothing (``max_task_retries=0``):
whether a call was applied is the shard's to say (see :mod:`gdn2ts.distributed.shard`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from gdn2ts.distributed.shard import Shard
from gdn2ts.distributed.spec import RunnerSpec, StoreSpec

__all__ = ["ShardLost", "LocalShard", "RayShard", "ACTOR_OPTIONS"]

ACTOR_OPTIONS = {"max_restarts": -1, "max_task_retries": 0, "num_cpus": 0}
"""Ray options of a shard actor: restarted without limit, no retries by Ray; ``num_cpus`` 0 so that more shards
than cores can be placed (each shard steps with one torch thread)."""


class ShardLost(Exception):
    """The shard died during the call (its reply is lost: the call may or may not have been applied)."""


class LocalShard:
    """A :class:`Shard` in the driver's process, on a thread of its own: every call runs on that thread (a store's
    connection belongs to the thread that opened it), one at a time, and local shards run side by side."""

    def __init__(self, runner: RunnerSpec, stores: StoreSpec, lease_wait: float = 60.0, pause: float = 0.0):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdn2ts-shard")
        self.shard = self.pool.submit(Shard, runner, stores, lease_wait, pause).result()

    def submit(self, method: str, *args) -> Future:
        return self.pool.submit(getattr(self.shard, method), *args)

    def result(self, call: Future):
        return call.result()

    def wait(self, timeout: float = 120.0) -> None:
        pass

    def stop(self) -> None:
        try:
            self.result(self.submit("close"))
        finally:
            self.pool.shutdown()


class RayShard:
    """A :class:`Shard` as a Ray actor (Ray must be initialised: ``ray.init(...)``)."""

    def __init__(self, runner: RunnerSpec, stores: StoreSpec, lease_wait: float = 60.0, pause: float = 0.0,
                 options: dict | None = None):
        import ray

        self.ray = ray
        self.actor = ray.remote(Shard).options(**{**ACTOR_OPTIONS, **(options or {})}).remote(
            runner, stores, lease_wait, pause)

    def submit(self, method: str, *args):
        return getattr(self.actor, method).remote(*args)

    def result(self, call):
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return self.ray.get(call)
        except RayActorError as e:
            raise ShardLost(str(e)) from None
        except RayTaskError as e:
            # the shard's own exception, without Ray's wrapping (its message is the one people read)
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else e) from None

    def wait(self, timeout: float = 120.0) -> None:
        """Until the actor answers (Ray restarting it), at most ``timeout`` seconds."""
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ray.get(self.actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def pid(self) -> int:
        """The process id of the actor (once it answers)."""
        self.wait()
        return self.ray.get(self.actor.ping.remote())

    def stop(self) -> None:
        try:
            self.result(self.submit("close"))
        finally:
            self.ray.kill(self.actor, no_restart=True)
