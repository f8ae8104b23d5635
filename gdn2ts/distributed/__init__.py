"""Streaming beyond one process: the online runner's verbs over shards (Ray actors, or objects in one process),
each owning whole partitions of the streams, each partition a store of its own. Ray is imported only when shards
run on it (the optional extra ``distributed``). See ``docs/streaming-distributed.md``."""

from gdn2ts.distributed.driver import ShardedResult, ShardedRunner
from gdn2ts.distributed.partition import assign, partition_of
from gdn2ts.distributed.shard import Shard
from gdn2ts.distributed.spec import Manifest, RunnerSpec, StoreSpec
from gdn2ts.distributed.view import ShardedView

__all__ = ["Manifest", "RunnerSpec", "Shard", "ShardedResult", "ShardedRunner", "ShardedView", "StoreSpec",
           "assign", "partition_of"]

