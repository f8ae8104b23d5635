"""A runner's streams from birth to removal: opening a runner in the user's units from a checkpoint, resetting
streams (their state forgotten, each starting afresh at its next row) and deleting them.

Reset and delete go through the runner's public parts only: a snapshot first (so the journal holds nothing a
replay could bring back), then the store's ``delete`` and ``commit`` as one transaction, then the working set lets
go of its copies. A failure leaves every state as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gdn2ts.models.checkpoint import Checkpoint, load_checkpoint
from gdn2ts.streaming.units import Units

if TYPE_CHECKING:
    from gdn2ts.streaming.runner import OnlineRunner

__all__ = ["from_checkpoint", "reset", "delete"]


def from_checkpoint(cls, checkpoint: Checkpoint | str, store, *, capacity: int = 4096, policy=None, learning=None,
                    limits=None, id_column: str | None = None, time_column: str | None = None) -> OnlineRunner:
    """A runner (of class ``cls``) in the user's units of a :class:`~gdn2ts.models.checkpoint.Checkpoint` or the
    path of one: its encoder, channels, covariates and :class:`~gdn2ts.streaming.units.Units`, its input bounds
    (``limits``, default the checkpoint's) and column names (default those it was trained with).

    Example:
        >>> import tempfile
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.models.checkpoint import Scaler, TimeSpec, save_checkpoint
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> enc = StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4, horizon=2))
        >>> path = save_checkpoint(tempfile.mkdtemp() + "/m.safetensors", enc, Scaler(("load",), (500.0,), (50.0,)),
        ...                        time=TimeSpec("datetime", 3600.0, time_zone="Europe/Paris"))
        >>> runner = OnlineRunner.from_checkpoint(path, MemoryStore())
        >>> runner.observe({"stream": ["a"], "time": ["2024-05-01 13:00"], "load": [520.0]}).accepted
        1
        >>> runner.forecast(["a"])["target_time"].to_list()[-1].isoformat()   # two hours after the origin
        '2024-05-01T15:00:00+02:00'
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    return cls(ckpt.encoder, store, ckpt.scaler.channels, ckpt.covariates,
               ckpt.columns[0] if id_column is None else id_column,
               ckpt.columns[1] if time_column is None else time_column, capacity=capacity, policy=policy,
               learning=learning, units=Units.from_checkpoint(ckpt), limits=ckpt.limits if limits is None else limits)


def reset(runner: OnlineRunner, stream_ids: Sequence[str]) -> list[str]:
    """Forget the states of ``stream_ids`` (everything observed, their statistics and learning history): each
    starts afresh at its next row, as a new stream. Ids the runner does not know are skipped. Returns the ids that
    were reset. Durable when it returns.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> runner = OnlineRunner(StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4)),
        ...                       MemoryStore(), ["load"])
        >>> _ = runner.observe({"stream": ["a", "b"], "time": [5.0, 5.0], "load": [0.1, 0.2]})
        >>> runner.reset(["a", "zz"]), runner.info(["a", "b"])["steps"].to_list()
        (['a'], [0, 1])
        >>> runner.observe({"stream": ["a"], "time": [1.0], "load": [0.3]}).accepted   # before 5.0: fine now
        1
    """
    info = runner.info(list(stream_ids))  # checks the ids
    known = list(dict.fromkeys(info.filter(info["steps"] > 0)["stream"].to_list()))
    _forget(runner, known)
    return known


def delete(runner: OnlineRunner, stream_ids: Sequence[str]) -> None:
    """Remove the streams ``stream_ids`` and everything kept for them from the store. An id the runner does not
    know raises :class:`~gdn2ts.streaming.UnknownStreamError` and nothing is removed. Durable when it returns.

    Example:
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> from gdn2ts.streaming import MemoryStore, OnlineRunner
        >>> runner = OnlineRunner(StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4)),
        ...                       MemoryStore(), ["load"])
        >>> _ = runner.observe({"stream": ["a"], "time": [1.0], "load": [0.1]})
        >>> runner.delete(["a"]); runner.info(["a"])["steps"].to_list()
        [0]
        >>> runner.delete(["a"])
        Traceback (most recent call last):
        ...
        gdn2ts.streaming.runner.UnknownStreamError: delete: unknown stream 'a'
    """
    from gdn2ts.streaming.runner import UnknownStreamError

    info = runner.info(list(stream_ids))  # checks the ids
    for sid, n in info.select("stream", "steps").rows():
        if n == 0:
            raise UnknownStreamError(f"delete: unknown stream {sid!r}")
    _forget(runner, list(dict.fromkeys(info["stream"].to_list())))


def _forget(runner: OnlineRunner, ids: list[str]) -> None:
    if not ids:
        return
    # a snapshot first: the journal then holds nothing that a replay could bring back to these streams
    runner.flush()
    try:
        runner.store.delete(ids)
        runner.store.commit()
    except BaseException:
        runner.store.rollback()
        raise
    # only once the store has forgotten them: after a failed commit the working set's copies stay valid
    runner.ws.drop(ids)
