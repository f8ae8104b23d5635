"""FSDP for the causal LM: FSDP1 (``strategy: fsdp``) and FSDP2 (``strategy: fsdp2``), both built from the meta
device.

Both shard every :class:`~gdn2ts.models.lm.LMBlock` as one unit and the root (embedding, final norm, head) as
another. No process holds the whole model at any time: the model is built on ``torch.device("meta")``, sharded,
and each shard filled from :class:`~gdn2ts.lm.meta_init.InitReplay` (the values of the model built on the CPU
after the same seed), one construction unit (one block, the embedding, the head) at a time.

- FSDP1, ``FullyShardedDataParallel`` (``use_orig_params=True``: one flat parameter per unit, the original
  parameters views into it), wrapped here rather than by Lightning's ``FSDPStrategy`` because Lightning passes
  the device's index, None on the CPU, where FSDP then refuses to start; with the device itself FSDP1 runs on
  gloo too. FSDP1 materializes each unit through ``param_init_fn`` before flattening and sharding it.
- FSDP2, ``fully_shard`` (each parameter a ``DTensor`` sharded on its first dimension, no flat parameters) under
  Lightning's ``ModelParallelStrategy``; after sharding, ``to_empty`` allocates the shards and each is copied
  from its unit's values.

``HYBRID_SHARD`` shards within a node and replicates across nodes (FSDP2: a 2-D mesh ``[num_nodes, devices]``).
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from gdn2ts.lm.meta_init import InitReplay
from gdn2ts.lm.train_config import TrainConfig
from gdn2ts.models.lm import CausalLM, LMBlock

__all__ = ["LMFSDPStrategy", "fsdp2_strategy", "fsdp_strategy", "make_strategy", "shard_model"]


class LMFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` for a model that :func:`shard_model` has wrapped. Fabric refuses the
    ``FSDPStrategy`` class itself off the GPU (its check is on that exact type), because Lightning's own wrapping
    passes the device's index, None on the CPU; the wrapping here passes the device, so FSDP1 also runs on the
    CPU through gloo (the CI test)."""


def fsdp_strategy(train: TrainConfig) -> FSDPStrategy:
    """Lightning's FSDP strategy for FSDP1: the sharding and activation checkpointing of every ``LMBlock`` when
    asked. The model is wrapped by :func:`shard_model`, checkpoints written by :mod:`gdn2ts.lm.checkpoint`.

    Example:
        >>> s = fsdp_strategy(TrainConfig(max_steps=1, strategy="fsdp", activation_checkpointing=True))
        >>> s.sharding_strategy.name, s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
        ('FULL_SHARD', {<class 'gdn2ts.models.lm.LMBlock'>})
    """
    return LMFSDPStrategy(sharding_strategy=train.fsdp_sharding,
                          activation_checkpointing_policy={LMBlock} if train.activation_checkpointing else None)


def _as_is(module: nn.Module, mesh) -> nn.Module:
    # the model arrives already sharded (shard_model): there is nothing left for the strategy to apply
    return module


def fsdp2_strategy(train: TrainConfig) -> ModelParallelStrategy:
    """Lightning's ``ModelParallelStrategy`` for FSDP2: its device mesh is ``[processes, 1]`` (the first axis
    shards), or ``[num_nodes, devices]`` with ``HYBRID_SHARD`` (replicated across nodes, sharded within one). The
    model is sharded by :func:`shard_model`, checkpoints written by :mod:`gdn2ts.lm.checkpoint`.

    Example:
        >>> s = fsdp2_strategy(TrainConfig(max_steps=1, strategy="fsdp2", devices=4, num_nodes=2))
        >>> s._data_parallel_size, s._tensor_parallel_size
        (8, 1)
    """
    hybrid = train.fsdp_sharding == "HYBRID_SHARD"
    rows, cols = (train.num_nodes, train.devices) if hybrid else (train.world_size, 1)
    return ModelParallelStrategy(parallelize_fn=_as_is, data_parallel_size=rows, tensor_parallel_size=cols)


def make_strategy(train: TrainConfig):
    """The Fabric strategy of ``train.strategy``: :func:`fsdp_strategy`, :func:`fsdp2_strategy`, or the name."""
    if train.strategy == "fsdp":
        return fsdp_strategy(train)
    if train.strategy == "fsdp2":
        return fsdp2_strategy(train)
    return train.strategy


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    # (module, attribute) of every parameter and buffer by qualified name, taken before wrapping: the module
    # objects stay while FSDP2 replaces the tensors and activation checkpointing adds wrappers around them
    return {f"{prefix}.{key}" if prefix else key: (module, key) for prefix, module in model.named_modules()
            for key, t in itertools.chain(module._parameters.items(), module._buffers.items()) if t is not None}


def _fsdp1(model: CausalLM, fabric: L.Fabric, train: TrainConfig, replay: InitReplay) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    names = {id(m): n for n, m in model.named_modules()}
    cache: dict = {}

    def value(name: str) -> torch.Tensor:
        # FSDP1 materializes a unit module by module: rebuild the unit once for all of them
        unit = replay.unit_of(name)
        if cache.get("unit") != unit:
            cache.clear()
            cache.update(unit=unit, values=replay.unit_values(unit))
        return cache["values"][name]

    def init(module: nn.Module) -> None:
        own = list(itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)))
        if not any(t.is_meta for _, t in own):
            return
        module.to_empty(device=fabric.device, recurse=False)
        with torch.no_grad():
            for key, t in itertools.chain(module.named_parameters(recurse=False),
                                          module.named_buffers(recurse=False)):
                t.copy_(value(f"{names[id(module)]}.{key}"))

    strategy = fabric.strategy
    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({LMBlock}), sharding_strategy=ShardingStrategy[train.fsdp_sharding],
        mixed_precision=strategy.mixed_precision_config, cpu_offload=strategy.cpu_offload, device_id=fabric.device,
        use_orig_params=True, limit_all_gathers=True, param_init_fn=init)


def _fsdp2(model: CausalLM, fabric: L.Fabric, train: TrainConfig, replay: InitReplay) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh = fabric.strategy.device_mesh
    mesh = mesh if train.fsdp_sharding == "HYBRID_SHARD" else mesh["data_parallel"]
    slots = _slots(model)
    if train.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LMBlock))
    reshard = train.fsdp_sharding != "SHARD_GRAD_OP"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    # the root's weights (embedding, head) are the first needed by the backward: kept gathered, as FSDP1 does
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model.to_empty(device=fabric.device)
    with torch.no_grad():
        for unit, _ in replay.units:
            for name, full in replay.unit_values(unit).items():
                module, key = slots[name]
                t = module._parameters[key] if key in module._parameters else module._buffers[key]
                if isinstance(t, DTensor):
                    # every process holds the same full values: each keeps its own piece, no communication
                    piece = distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
                    t.to_local().copy_(piece.to_local())
                else:
                    t.copy_(full)
    return model


def shard_model(model: CausalLM, fabric: L.Fabric, train: TrainConfig) -> nn.Module:
    """``model``, built on the meta device, sharded as ``train.strategy`` (``fsdp`` or ``fsdp2``) over
    ``fabric``'s (launched) processes and initialized from the CPU generator's current state: after
    ``fabric.seed_everything(seed)``, every parameter equals that of ``CausalLM(config)`` built on the CPU then.
    The generator is left as building the model would leave it."""
    if train.strategy not in ("fsdp", "fsdp2"):
        raise ValueError(f"shard_model: train.strategy expected 'fsdp' or 'fsdp2', got {train.strategy!r}")
    replay = InitReplay(model)
    sharded = (_fsdp1 if train.strategy == "fsdp" else _fsdp2)(model, fabric, train, replay)
    torch.set_rng_state(replay.final_state)
    return sharded
