"""How a training run reads its data across processes: in a fixed number of shares, whatever the number of
processes, so that a run resumed on another number of processes reads exactly what it would have read.

A run reads its blocks in ``S`` shares (``TrainConfig.data_shares``; by default the number of processes of its
first launch), share ``s`` being ``data.shard(s, S)`` (for :class:`~gdn2ts.lm.data.PackedBlocks`, the documents
``i`` with ``i % S == s``, each share packing its own). Process ``r`` of ``W`` reads the ``k = S / W`` shares
``r * k, ..., r * k + k - 1`` (``W`` must divide ``S``). Each optimizer step takes ``n = batch_size * grad_accum * W
/ S`` consecutive blocks from every share (``S`` must divide the blocks of a step), the process's shares in
increasing order, and cuts them into ``grad_accum`` micro-batches of ``batch_size`` blocks: the step's
micro-batches, process after process, run through the shares in order whatever ``W`` is.

So what a step trains on depends on ``S`` and the step's blocks (``batch_size * grad_accum * W``), not on ``W``:
with ``S = 2``, two processes with ``grad_accum: 1`` read one share each, and one process with ``grad_accum: 2``
reads share 0 into its first micro-batch and share 1 into its second; the same micro-batches, and (gradients being
averaged over processes and micro-batches alike) the same step: bit for bit with two terms, as here, and up to the
order of the gradient sum with more. A checkpoint keeps every share's position, so a resume on any ``W`` dividing
``S`` continues each share where it stopped.
"""

from __future__ import annotations

from gdn2ts.lm.train_config import TrainError

__all__ = ["ShareReader", "check_layout"]


def check_layout(shares: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Blocks per share and optimizer step, ``batch_size * grad_accum * world_size / shares``; a TrainError when
    the processes cannot split the shares, or the shares the step, evenly.

    Example:
        >>> check_layout(shares=2, world_size=1, batch_size=4, grad_accum=2)
        4
    """
    if shares % world_size:
        raise TrainError(f"fit_lm: the training data is read in {shares} shares, which {world_size} processes "
                         f"cannot split evenly; use a number of processes that divides {shares} (train.data_shares "
                         f"is fixed for a run: set it at the start to a multiple of every size you will use)")
    blocks = batch_size * grad_accum * world_size
    if blocks % shares:
        raise TrainError(f"fit_lm: one optimizer step takes {blocks} blocks (batch_size {batch_size} x grad_accum "
                         f"{grad_accum} x {world_size} processes), which {shares} data shares cannot supply evenly; "
                         f"make the blocks per step a multiple of train.data_shares")
    return blocks // shares


class ShareReader:
    """This process's blocks, step by step: its shares of ``data`` (module docstring).

    Args:
        data: a dataset with ``shard(share, shares)`` whose shares have ``state_dict()`` / ``load_state_dict()``
            (:class:`~gdn2ts.lm.data.PackedBlocks`).
        shares, rank, world_size: the run's share count, this process and the number of processes.
        batch_size, grad_accum: blocks per micro-batch, micro-batches per step.

    Example:
        >>> from gdn2ts.lm.data import PackedBlocks
        >>> from gdn2ts.lm.sources import Documents
        >>> from gdn2ts.lm.tokenizer import ByteTokenizer
        >>> data = PackedBlocks(Documents(["ab", "cd", "ef", "gh"]), ByteTokenizer(), block_len=2)
        >>> reader = ShareReader(data, shares=2, rank=0, world_size=1, batch_size=1, grad_accum=2)
        >>> [[b["input_ids"].tolist() for b in micro] for micro in reader.step()]
        [[[97, 98]], [[99, 100]]]
        >>> reader.states()[1]["positions"]
        [[0, 2, 0]]
    """

    def __init__(self, data, shares: int, rank: int, world_size: int, batch_size: int, grad_accum: int):
        self.per_share = check_layout(shares, world_size, batch_size, grad_accum)
        self.shares, self.batch_size, self.grad_accum = shares, batch_size, grad_accum
        k = shares // world_size
        self.mine = list(range(rank * k, rank * k + k))
        self.data = {s: data.shard(s, shares) for s in self.mine}
        self._iters: dict | None = None
        self.taken = 0

    def load(self, states: list[dict]) -> None:
        """Continue every share of this process from ``states`` (one per share of the run, as :meth:`states`
        gathered over the processes gives them); before the first :meth:`step`."""
        if len(states) != self.shares:
            raise TrainError(f"fit_lm: the checkpoint holds {len(states)} data positions, the run reads "
                             f"{self.shares} shares")
        for s in self.mine:
            ids, count = states[s].get("share_ids"), states[s].get("shares")
            if ids != [s] or count != self.shares:
                raise TrainError(f"fit_lm: the checkpoint's data position {s} is of share(s) {ids} of {count}, "
                                 f"expected share {s} of {self.shares}")
            self.data[s].load_state_dict(states[s])

    def step(self) -> list[list[dict]]:
        """The ``grad_accum`` micro-batches (lists of ``batch_size`` blocks) of the next optimizer step."""
        if self._iters is None:
            self._iters = {s: iter(d) for s, d in self.data.items()}
        blocks = []
        for s in self.mine:
            for _ in range(self.per_share):
                try:
                    blocks.append(next(self._iters[s]))
                except StopIteration:
                    raise TrainError(f"fit_lm: the training data ran out after {self.taken} blocks of share {s} in "
                                     f"this run; give a repeating dataset (PackedBlocks(repeat=True)) or fewer "
                                     f"steps") from None
            self.taken += self.per_share
        b = self.batch_size
        return [blocks[i * b:(i + 1) * b] for i in range(self.grad_accum)]

    def states(self) -> dict[int, dict]:
        """``{share: position}`` of this process's shares (plain ints)."""
        return {s: d.state_dict() for s, d in self.data.items()}
