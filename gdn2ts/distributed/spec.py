"""What a shard needs to open its partitions' runners: the model and runner settings (:class:`RunnerSpec`), where
the partitions' stores live (:class:`StoreSpec`), and the driver's record of who owns which partition
(:class:`Manifest`, a JSON file written atomically beside the stores)."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdn2ts.models import StreamEncoder
from gdn2ts.models.checkpoint import load_checkpoint
from gdn2ts.models.units import Limits
from gdn2ts.streaming import CommitPolicy, LearnConfig, OnlineRunner, SQLiteStore
from gdn2ts.streaming.frames import ObservationSchema
from gdn2ts.streaming.units import Units

__all__ = ["RunnerSpec", "StoreSpec", "Manifest"]

MANIFEST = "manifest.json"
FORMAT = "gdn2ts.sharded.v1"


@dataclass(frozen=True)
class RunnerSpec:
    """How every partition's :class:`~gdn2ts.streaming.OnlineRunner` is opened: from a checkpoint (the user's
    units) or over a bare encoder (model units), with the runner's settings. Each partition's runner gets its own
    copy of the model (a learning step reaches every partition through its own store).

    Example:
        >>> from gdn2ts.models import EncoderConfig
        >>> spec = RunnerSpec(encoder=StreamEncoder(EncoderConfig(n_channels=1, hidden_size=8, head_dim=4)),
        ...                   channels=("load",))
        >>> spec.schema().channels
        ('load',)
    """

    checkpoint: str | None = None
    """A checkpoint path (``gdn2ts stream train``): runners in the user's units, with its channels and bounds."""
    encoder: StreamEncoder | None = None
    """Or a bare encoder: runners in model units over ``channels`` and ``covariates``."""
    channels: tuple[str, ...] = ()
    """The encoder's channel names (bare encoder only)."""
    covariates: tuple[str, ...] = ()
    """The encoder's covariate names (bare encoder only)."""
    id_column: str | None = None
    """The stream id column (default: the checkpoint's, or ``stream``)."""
    time_column: str | None = None
    """The timestamp column (default: the checkpoint's, or ``time``)."""
    capacity: int = 4096
    """Streams each partition's runner holds in memory."""
    policy: CommitPolicy | None = None
    """Each runner's commit policy (default ``CommitPolicy()``)."""
    learning: LearnConfig | None = None
    """Learn online (every partition's store learns with this configuration), or None."""
    limits: Limits | None = None
    """Input bounds (default: the checkpoint's, or ``Limits()``)."""
    threads: int | None = 1
    """torch CPU threads of a shard process (None: torch's choice)."""
    _ckpt: object = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if (self.checkpoint is None) == (self.encoder is None):
            raise ValueError("RunnerSpec: expected exactly one of 'checkpoint' and 'encoder'")
        if self.encoder is not None and not isinstance(self.encoder, StreamEncoder):
            raise ValueError(f"RunnerSpec: 'encoder' expected a StreamEncoder, got {type(self.encoder).__name__}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"RunnerSpec: 'capacity' expected a positive int, got {self.capacity!r}")
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "covariates", tuple(self.covariates))

    def _checkpoint(self):
        if self._ckpt is None:
            object.__setattr__(self, "_ckpt", load_checkpoint(self.checkpoint))
        return self._ckpt

    def columns(self) -> tuple[str, str]:
        """The id and time column names."""
        default = self._checkpoint().columns if self.checkpoint is not None else ("stream", "time")
        return (self.id_column or default[0], self.time_column or default[1])

    def schema(self) -> ObservationSchema:
        """The columns (and units) every batch is read with."""
        id_col, time_col = self.columns()
        if self.checkpoint is None:
            return ObservationSchema(self.channels, self.covariates, id_col, time_col)
        ckpt = self._checkpoint()
        return ObservationSchema(ckpt.scaler.channels, ckpt.covariates, id_col, time_col,
                                 Units.from_checkpoint(ckpt))

    def dtype(self) -> torch.dtype:
        model = self.encoder if self.encoder is not None else self._checkpoint().encoder
        return next(model.parameters()).dtype

    def model(self) -> StreamEncoder:
        """A fresh copy of the model (as given: learned weights are loaded from a store's blob)."""
        if self.checkpoint is not None:
            return load_checkpoint(self.checkpoint).encoder
        return copy.deepcopy(self.encoder)

    def open(self, store) -> OnlineRunner:
        """A runner over ``store`` with a fresh copy of the model (the runner owns the store: closed if it
        refuses to open)."""
        id_col, time_col = self.columns()
        if self.checkpoint is not None:
            # a copy of the model per partition: each runner loads its own store's learned weights into it
            return OnlineRunner.from_checkpoint(load_checkpoint(self.checkpoint), store, capacity=self.capacity,
                                                policy=self.policy, learning=self.learning, limits=self.limits,
                                                id_column=id_col, time_column=time_col)
        return OnlineRunner(copy.deepcopy(self.encoder), store, self.channels, self.covariates, id_col, time_col,
                            capacity=self.capacity, policy=self.policy, learning=self.learning, limits=self.limits)


@dataclass(frozen=True)
class StoreSpec:
    """Where a sharded store lives: the folder ``root`` holds the manifest and, without ``dsn``, one SQLite file per
    partition (``part-00007.db``: one machine); with ``dsn``, each partition is a PostgreSQL store (schema
    ``<prefix>_00007``) that a shard on any machine can open.

    Example:
        >>> StoreSpec("/tmp/fleet").describe(7)
        '/tmp/fleet/part-00007.db'
    """

    root: str
    """The folder of the manifest (and of the SQLite files)."""
    dsn: str | None = None
    """A PostgreSQL connection string: partitions in that database instead of SQLite files."""
    prefix: str = "gdn2ts_part"
    """Schema name prefix of the PostgreSQL partitions."""
    synchronous: str = "NORMAL"
    """SQLite's ``synchronous`` (``FULL`` adds power-loss safety)."""

    def __post_init__(self):
        object.__setattr__(self, "root", str(self.root))

    def describe(self, partition: int) -> str:
        """The partition's SQLite path or PostgreSQL schema."""
        if self.dsn is not None:
            return f"{self.prefix}_{partition:05d}"
        return str(Path(self.root) / f"part-{partition:05d}.db")

    def open(self, partition: int, readonly: bool = False):
        """The partition's store (writer lease taken unless ``readonly``)."""
        if self.dsn is not None:
            from gdn2ts.streaming.postgres_store import PostgresStore

            return PostgresStore(self.dsn, name=self.describe(partition), readonly=readonly)
        return SQLiteStore(self.describe(partition), synchronous=self.synchronous, readonly=readonly)


@dataclass
class Manifest:
    """The driver's record of a sharded store: the number of partitions (fixed at creation), each partition's
    owner shard, and a rebalance in progress (``target``: the owners it moves to, recorded before any move).

    Written atomically (a temporary file, fsync, rename, fsync of the folder), so a crash leaves the old or the
    new version, never a torn one.
    """

    partitions: int
    owners: list[int]
    target: list[int] | None = None

    @property
    def shards(self) -> int:
        return max(self.owners if self.target is None else self.target) + 1

    @staticmethod
    def path(root: str | Path) -> Path:
        return Path(root) / MANIFEST

    @classmethod
    def load(cls, root: str | Path) -> Manifest | None:
        path = cls.path(root)
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            m = cls(int(doc["partitions"]), [int(s) for s in doc["owners"]],
                    None if doc.get("target") is None else [int(s) for s in doc["target"]])
            if len(m.owners) != m.partitions or (m.target is not None and len(m.target) != m.partitions):
                raise ValueError("owners and partitions disagree")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"sharded store {str(root)!r}: manifest {path} cannot be read ({e})") from None
        return m

    def save(self, root: str | Path) -> None:
        path = self.path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        doc = {"format": FORMAT, "partitions": self.partitions, "owners": self.owners, "target": self.target}
        with open(tmp, "w") as f:
            f.write(json.dumps(doc) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
