"""The trainer settings of an LM training recipe (``tasks/lm/train/*.yaml``, section ``train:``): nodes, devices,
precision, strategy (single device, DDP, FSDP1 or FSDP2), batch and accumulation, how the data is split across
processes, how long, and how often to log, validate and save (full or sharded checkpoints)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CHECKPOINTS", "PRECISIONS", "STRATEGIES", "TrainConfig", "TrainError"]

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "fsdp", "fsdp2")
SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
CHECKPOINTS = ("auto", "full", "sharded")


class TrainError(ValueError):
    """A training run cannot start or continue: bad data, a checkpoint of another run."""


def _fail(field: str, expected: str, got: object) -> None:
    raise ValueError(f"TrainConfig: field '{field}' expected {expected}, got {got!r}")


def _int(field: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, f"{'None or ' if allow_none else ''}an int >= {low}", value)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: one optimizer step takes ``batch_size * block_len`` tokens on each of ``devices`` devices,
    ``grad_accum`` times over.

    Example:
        >>> cfg = TrainConfig(batch_size=4, grad_accum=2, max_steps=None, max_tokens=10_000)
        >>> cfg.total_steps(block_len=128, world_size=1)  # ceil(10,000 / (4 * 128 * 2))
        10
    """

    batch_size: int = 8
    """Blocks per micro-batch on each device."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    max_steps: int | None = 1000
    """Optimizer steps to train (None: set by ``max_tokens``; with both, whichever ends first)."""
    max_tokens: int | None = None
    """Token budget: ``ceil(max_tokens / tokens per step)`` optimizer steps (None: set by ``max_steps``)."""
    stop_at: int | None = None
    """End this launch after this optimizer step, writing ``last.ckpt``; the schedule still spans the whole run
    and a resumed launch continues it (None: run to the end)."""
    accelerator: str = "auto"
    """``auto`` (a GPU when present), ``cpu``, ``gpu`` or ``cuda``."""
    devices: int = 1
    """Devices (processes) on each node; data parallel over all of them."""
    num_nodes: int = 1
    """Machines taking part; the run has ``num_nodes * devices`` processes. Each node starts its own launch (with
    its ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, or under torchrun or SLURM, which Lightning reads)."""
    precision: str = "auto"
    """``auto`` (``bf16-mixed`` on a GPU, ``32-true`` on the CPU), ``32-true``, ``bf16-mixed``, ``bf16-true``."""
    strategy: str = "auto"
    """``auto`` (one device, or DDP over several), ``ddp``, ``fsdp`` (FSDP1: ``FullyShardedDataParallel``, each
    ``LMBlock`` a unit) or ``fsdp2`` (``fully_shard`` on each ``LMBlock`` and the root). Both FSDPs build the
    model on the meta device and initialize each shard as the model built on the CPU would be."""
    fsdp_sharding: str = "FULL_SHARD"
    """FSDP sharding strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP`` (weights kept gathered from the forward to the
    backward), ``HYBRID_SHARD`` (sharded within a node, replicated across nodes) or ``NO_SHARD`` (``fsdp`` only;
    with ``fsdp2`` use ``ddp``)."""
    checkpoint: str = "auto"
    """``full``: one file gathered on rank 0; ``sharded``: a folder of safetensors files written by every process
    through torch distributed checkpoint, readable by any number of processes; ``auto``: sharded under ``fsdp`` and
    ``fsdp2``, full otherwise."""
    data_shares: int | None = None
    """Shares the training data is read in, fixed for the whole run (each process reads ``data_shares /
    processes`` of them, ``gdn2ts.lm.shares``): a resume may use any number of processes that divides it, keeping
    the blocks per step. None: the number of processes of the first launch."""
    activation_checkpointing: bool = False
    """Recompute each ``LMBlock``'s activations in the backward (saves memory at long context)."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (fuses the norms, gates and MLP pieces around the GDN-2 op; the
    first steps pay the compilation)."""
    packed: bool = True
    """Train on packed documents (each mixer restarts at every document start, ``cu_seqlens``); False runs each
    block as one sequence (state flows across the documents inside a block; on a GPU this takes the Triton chunked
    kernels, which do not take ``cu_seqlens`` yet)."""
    seed: int = 0
    """Seed of the model's initialization (the data order is the data's own)."""
    log_every: int = 10
    """Optimizer steps per logging interval (loss, learning rate, gradient norm, tokens/s, MFU)."""
    val_every: int | None = 100
    """Optimizer steps between validations on the held-out blocks, and one at the end (None: never)."""
    val_blocks: int = 32
    """Held-out blocks per validation and process (the first ones of each process's share of the validation data,
    the same every time)."""
    save_every: int | None = None
    """Optimizer steps between checkpoints (``last.ckpt`` is always written at the end; None: only then)."""
    peak_tflops: float | None = None
    """Dense bf16 peak of one device in TFLOP/s for the MFU (None: from the GPU's name; none on a CPU)."""
    threads: int | None = 1
    """torch CPU threads (None: torch's choice)."""

    def __post_init__(self):
        _int("batch_size", self.batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        _int("max_steps", self.max_steps, 1, allow_none=True)
        _int("max_tokens", self.max_tokens, 1, allow_none=True)
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("TrainConfig: 'max_steps' or 'max_tokens' expected (how long to train), got neither")
        _int("stop_at", self.stop_at, 1, allow_none=True)
        _int("devices", self.devices, 1)
        _int("num_nodes", self.num_nodes, 1)
        _int("data_shares", self.data_shares, 1, allow_none=True)
        _int("seed", self.seed, 0)
        _int("log_every", self.log_every, 1)
        _int("val_every", self.val_every, 1, allow_none=True)
        _int("val_blocks", self.val_blocks, 1)
        _int("save_every", self.save_every, 1, allow_none=True)
        _int("threads", self.threads, 1, allow_none=True)
        for name, allowed in (("accelerator", ACCELERATORS), ("precision", PRECISIONS),
                              ("strategy", STRATEGIES), ("fsdp_sharding", SHARDING), ("checkpoint", CHECKPOINTS)):
            if getattr(self, name) not in allowed:
                _fail(name, f"one of {allowed}", getattr(self, name))
        if self.strategy == "fsdp2" and self.fsdp_sharding == "NO_SHARD":
            _fail("fsdp_sharding", "FULL_SHARD, SHARD_GRAD_OP or HYBRID_SHARD with strategy 'fsdp2' (NO_SHARD is "
                  "data parallel: strategy 'ddp')", self.fsdp_sharding)
        for name in ("activation_checkpointing", "compile", "packed"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "a bool", getattr(self, name))
        p = self.peak_tflops
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p)
                              or p <= 0):
            _fail("peak_tflops", "None or a finite float > 0", p)

    @property
    def world_size(self) -> int:
        """Processes of the run: ``num_nodes * devices``."""
        return self.num_nodes * self.devices

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are sharded folders (``checkpoint``, with ``auto`` decided by the strategy)."""
        return self.checkpoint == "sharded" or (self.checkpoint == "auto" and self.strategy in ("fsdp", "fsdp2"))

    def tokens_per_step(self, block_len: int, world_size: int) -> int:
        """Tokens of one optimizer step over all devices: ``batch_size * block_len * grad_accum * world_size``."""
        return self.batch_size * block_len * self.grad_accum * world_size

    def total_steps(self, block_len: int, world_size: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or the token budget over :meth:`tokens_per_step`, or the
        smaller of the two."""
        steps = [self.max_steps] if self.max_steps is not None else []
        if self.max_tokens is not None:
            steps.append(math.ceil(self.max_tokens / self.tokens_per_step(block_len, world_size)))
        return min(steps)
