"""One weight lineage across shards: a learn round makes one AdamW step from the matured windows of every
partition, and every partition then serves the new weight version.

The protocol (driver :meth:`~gdn2ts.distributed.ShardedRunner.learn`, partitions through their shards):

1. **Gradients.** Each partition plans the windows of its streams (exactly as :meth:`OnlineRunner.learn` does:
   matured positions after ``learn.through``, no leakage) and returns the gradient of the *summed* pinball loss
   over its valid targets, the number of targets and its weight version. Nothing changes in the store.
2. **One step.** The driver checks that every partition is at the same version ``v``, adds the gradients in
   partition order (so the sum is the same whatever the number of shards), divides by the number of targets
   (the gradient of the mean loss over all windows), and makes one AdamW step (gradient norm clipped) on its own
   copy of the model, loaded from the version-``v`` blob: the version ``v + 1`` blob (weights, AdamW's state, the
   lineage).
3. **Install.** Every partition, with windows or not, snapshots (its journal so far was applied with version
   ``v``), then commits the new blob and its learned streams' ``learn.through`` in one transaction, and only then
   serves version ``v + 1`` and acknowledges. A partition already at ``v + 1`` (a retried install) does nothing.

So a partition never goes back: its version is in its store, committed before it acknowledges, and a restarted
shard reopens it at that version. A round cut short (the driver died between installs) leaves some partitions at
``v + 1`` and others at ``v``; the next driver, or the next round, first installs the newest blob on the others
(their windows of the cut round are learned from in a later round).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gdn2ts.models import StreamEncoder
from gdn2ts.streaming.history import THROUGH, plan_windows
from gdn2ts.streaming.learn import MODEL_BLOB, Learner, LearnResult, decode_learned
from gdn2ts.streaming.records import check_ids
from gdn2ts.streaming.runner import OnlineRunner, UnknownStreamError, model_fingerprint
from gdn2ts.streaming.train import pinball_loss

__all__ = ["gradients", "install", "step"]


def _learner(runner: OnlineRunner) -> Learner:
    if runner.learner is None:
        raise ValueError("learn: the partitions do not learn; open the sharded store with "
                         "RunnerSpec(learning=LearnConfig(...)) on new stores")
    return runner.learner


def _plan(runner: OnlineRunner, ids: list[str]):
    """The slots of ``ids`` and their learning plan (None: nothing matured), as ``OnlineRunner.learn`` makes it."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"learn: stream ids expected distinct, got {ids}")
    slots = runner.ws.acquire(ids)
    for i in np.flatnonzero(runner.ws.steps[slots] == 0).tolist():
        raise UnknownStreamError(f"learn: unknown stream {ids[i]!r}")
    names = [k for k in runner.layout.shapes if k.startswith("hist.")] + [THROUGH]
    host = {k: v.cpu().numpy() for k, v in runner.ws.gather(slots).items() if k in names}
    cfg = runner.encoder.config
    return slots, plan_windows(host, runner.ws.last_time[slots], runner.learning, cfg.horizon, cfg.time_unit)


def gradients(runner: OnlineRunner, stream_ids: Sequence[str]) -> dict:
    """Step 1 for one partition: ``{"version", "windows", "targets", "loss", "grads"}`` with ``loss`` the summed
    pinball loss and ``grads`` its gradient per trainable parameter (None for all when nothing matured)."""
    learner = _learner(runner)
    ids = check_ids(stream_ids)
    out = {"version": learner.version, "windows": 0, "targets": 0, "loss": 0.0, "grads": None}
    if not ids:
        return out
    _, plan = _plan(runner, ids)
    if plan is None:
        return out
    enc, p = runner.encoder, learner.params[0]
    targets = plan.targets.to(p.device)
    valid = ~torch.isnan(targets)
    with torch.enable_grad():
        forecast = enc(plan.values.to(p.device, p.dtype), plan.times.to(p.device),
                       None if plan.covariates is None else plan.covariates.to(p.device, p.dtype))["forecast"]
        n = valid.sum()
        loss = pinball_loss(forecast, targets.to(p.dtype), enc.config.quantiles, valid) * n
        grads = torch.autograd.grad(loss, learner.params, allow_unused=True)
    out.update(windows=len(plan.rows), targets=int(n), loss=float(loss.detach()),
               grads=[torch.zeros_like(q) if g is None else g.detach() for q, g in zip(learner.params, grads,
                                                                                       strict=True)])
    return out


def step(encoder: StreamEncoder, blob: bytes, parts: Sequence[dict]) -> tuple[bytes | None, LearnResult]:
    """Step 2, on the driver: one AdamW step of ``encoder`` (a copy of the model, loaded from ``blob``, the
    version every partition holds) on the summed gradients ``parts`` (partition order). Returns the new blob
    (None when no partition had a window) and what the round did."""
    learned = decode_learned(blob)
    targets = sum(part["targets"] for part in parts)
    windows = sum(part["windows"] for part in parts)
    if targets == 0:
        return None, LearnResult(version=learned.version)
    learner = Learner(encoder, learned.config, learned.lineage)
    learner.load(learned, model_fingerprint)
    total = None
    for part in parts:
        if part["grads"] is not None:
            total = part["grads"] if total is None else [a + b for a, b in zip(total, part["grads"], strict=True)]
    for param, g in zip(learner.params, total, strict=True):
        param.grad = (g / targets).to(param.device, param.dtype)
    torch.nn.utils.clip_grad_norm_(learner.params, learned.config.grad_clip)
    learner.opt.step()
    learner.opt.zero_grad(set_to_none=True)
    loss = sum(part["loss"] for part in parts) / targets
    new = learner.encode(learned.version + 1, model_fingerprint(encoder))
    return new, LearnResult(1, windows, targets, loss, learned.version + 1)


def install(runner: OnlineRunner, stream_ids: Sequence[str], blob: bytes) -> int:
    """Step 3 for one partition: commit ``blob`` (a newer version of this lineage) with the new ``learn.through``
    of ``stream_ids`` in one transaction, then serve it. A partition at that version or a newer one is left as it
    is (a retried install). Returns the version it serves. If anything fails, the partition is as it was."""
    learner = _learner(runner)
    learned = decode_learned(blob)
    if learned.lineage != learner.lineage:
        raise ValueError(f"install: weights of lineage {learned.lineage!r}, this partition learns "
                         f"{learner.lineage!r}")
    if learned.version <= learner.version:
        return learner.version
    ids = check_ids(stream_ids)
    slots, plan = _plan(runner, ids) if ids else (np.zeros(0, dtype=np.int64), None)
    index = torch.from_numpy(slots).to(runner.device)
    before = runner.ws.pools[THROUGH].index_select(0, index)
    try:
        runner.flush()
        if plan is not None:
            runner.ws.pools[THROUGH].index_copy_(0, index, torch.from_numpy(plan.through).to(runner.device))
            runner.store.write_rows(ids, runner.ws.rows(slots, runner.seq))
        runner.store.put_blob(MODEL_BLOB, blob)
        runner.store.commit()
    except BaseException:
        runner.store.rollback()
        runner.ws.pools[THROUGH].index_copy_(0, index, before)
        raise
    if plan is not None:
        runner.ws.dirty[slots], runner.ws.seqs[slots] = False, runner.seq
    learner.load(learned, model_fingerprint)
    return learner.version


def blob_of(runner: OnlineRunner) -> bytes:
    """The partition's learned-weights blob."""
    _learner(runner)
    return runner.store.get_blob(MODEL_BLOB)


def newest(versions: Mapping[int, int]) -> tuple[int, int]:
    """``(partition, version)`` of the newest version (the lowest partition among equals)."""
    p = min(versions, key=lambda q: (-versions[q], q))
    return p, versions[p]
