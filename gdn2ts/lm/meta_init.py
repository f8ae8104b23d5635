"""Initialization without a full model in any process: the model is built on ``torch.device("meta")``, sharded,
and each process then fills its shards with exactly the values the model would have had if built on the CPU after
the same seed (``torch.manual_seed(seed); CausalLM(config)``), one construction unit at a time.

Why a replay: the values of a model built on the CPU are a function of the order in which its constructors draw
from the CPU generator, not of each parameter alone. :class:`InitReplay` reproduces that order:

1. the root's children (through plain containers such as ``nn.ModuleList``) are its construction units, built
   in registration order (``embed``, ``blocks.0``, ..., ``norm``, ``lm_head`` for the causal LM);
2. a unit is rebuilt by copying it off the meta device and calling ``reset_parameters()`` on every module of it
   that has one, children before parents: PyTorch's convention, in which each constructor builds its children in
   order and ends by calling its own ``reset_parameters()``;
3. then the root's own ``reset_parameters()`` (the LM re-draws its embedding, head, MLP and attention weights), run
   on the meta model with every in-place fill of a parameter (``normal_``, ``uniform_``, ``fill_``, ``zero_``)
   recorded with the generator's state before it, so that it can be redone on that one parameter later.

Construction draws once (recording the generator's state at each unit and fill); :meth:`InitReplay.unit_values`
then rebuilds any unit from its recorded state, so a process holds one unit at a time (one block, or the
embedding), whatever order its sharding asks for them in. A module whose constructor draws outside
``reset_parameters()`` would break the equality: ``tests/lm/test_lm_fsdp.py`` checks it for every mixer.
Parameters are poisoned with NaN before the rebuild, so one that no ``reset_parameters()`` writes raises.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["InitReplay"]

aten = torch.ops.aten
# in-place ops that overwrite a whole tensor (random draws and constants): redoable on that tensor alone
_FILLS = {aten.normal_.default, aten.uniform_.default, aten.fill_.Scalar, aten.zero_.default,
          aten.bernoulli_.float, aten.exponential_.default, aten.log_normal_.default, aten.cauchy_.default,
          aten.geometric_.default, aten.random_.default, getattr(aten.random_, "from"), aten.random_.to}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _is_container(module: nn.Module) -> bool:
    own = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
    return isinstance(module, _CONTAINERS) and next(own, None) is None


def _units(root: nn.Module) -> list[tuple[str, nn.Module]]:
    units = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if _is_container(child):
                visit(f"{prefix}{name}.", child)
            else:
                units.append((f"{prefix}{name}", child))

    visit("", root)
    return units


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        yield from _post_order(child)
    yield module


def _rebuild(unit: nn.Module) -> nn.Module:
    """A CPU copy of the meta ``unit`` with its parameters drawn as its constructor draws them (NaN where none
    is written)."""
    built = copy.deepcopy(unit).to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(built.parameters(), built.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
        for module in _post_order(built):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return built


class _Record(TorchDispatchMode):
    """Records the root's whole-tensor fills of its (meta) parameters and draws them on a CPU scratch tensor, so
    that the generator advances as it would on the real parameters."""

    def __init__(self, names: dict[int, str], root: str):
        super().__init__()
        self.names, self.root, self.events = names, root, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else None
        name = self.names.get(id(target))
        if func not in _FILLS or name is None:
            raise ValueError(f"InitReplay: {self.root}.reset_parameters() runs {func} on "
                             f"{name or type(target).__name__}; only whole-tensor fills of parameters "
                             f"({sorted(str(f) for f in _FILLS)}) can be redone one parameter at a time")
        state = torch.get_rng_state()
        func(torch.empty(target.shape, dtype=target.dtype), *args[1:], **kwargs)
        self.events.append((name, func, args[1:], kwargs, state))
        return target


class InitReplay:
    """The CPU initialization of ``model`` (built on the meta device), unit by unit (module docstring).

    Args:
        model: the model on ``torch.device("meta")``; it is not modified.
        rng_state: the CPU generator's state the model would be built from (default: the current one, so that
            ``torch.manual_seed(s); InitReplay(meta_model)`` replays ``torch.manual_seed(s); Model(...)``).

    The global generator is left as it was; :attr:`final_state` is its state after the model's construction.

    Example:
        >>> from gdn2ts.lm import load_recipe
        >>> from gdn2ts.models.lm import CausalLM
        >>> cfg = load_recipe("tiny_gdn2")
        >>> with torch.device("meta"):
        ...     meta = CausalLM(cfg)
        >>> _ = torch.manual_seed(0)
        >>> replay = InitReplay(meta)
        >>> _ = torch.manual_seed(0)
        >>> ref = CausalLM(cfg)
        >>> values = replay.unit_values("blocks.1")
        >>> all(torch.equal(v, ref.get_parameter(k)) for k, v in values.items())
        True
        >>> [name for name, _ in replay.units][:3]
        ['embed', 'blocks.0', 'blocks.1']
    """

    def __init__(self, model: nn.Module, rng_state: torch.Tensor | None = None):
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if not t.is_meta:
                raise ValueError(f"InitReplay: argument 'model' expected a model on the meta device, got {name!r} "
                                 f"on {t.device}")
        own = [n for n, _ in itertools.chain(model.named_parameters(recurse=False), model.named_buffers(recurse=False))]
        if own:
            raise ValueError(f"InitReplay: the root {type(model).__name__} holds {own} itself; only its children's "
                             "parameters can be replayed in construction order")
        self.units = _units(model)
        owner: dict[int, str] = {}
        for unit_name, unit in self.units:
            for t in itertools.chain(unit.parameters(), unit.buffers()):
                if owner.setdefault(id(t), unit_name) != unit_name:
                    raise ValueError(f"InitReplay: a tensor is shared by {owner[id(t)]!r} and {unit_name!r}; tied "
                                     "tensors across units are not replayed")
        # copies (on the meta device, free): the model's own modules may be sharded in place afterwards
        self._unit_of = {name: copy.deepcopy(unit) for name, unit in self.units}
        self._states: dict[str, torch.Tensor] = {}
        names = {id(p): n for n, p in itertools.chain(model.named_parameters(), model.named_buffers())}
        with torch.random.fork_rng(devices=[]):
            if rng_state is not None:
                torch.set_rng_state(rng_state)
            for unit_name, unit in self.units:
                self._states[unit_name] = torch.get_rng_state()
                _rebuild(unit)
            reset = getattr(model, "reset_parameters", None)
            record = _Record(names, type(model).__name__)
            if callable(reset):
                with record, torch.no_grad():
                    reset()
            self.final_state = torch.get_rng_state()
        self._events = record.events

    def unit_values(self, unit: str) -> dict[str, torch.Tensor]:
        """Full CPU values ``{qualified name: tensor}`` of the parameters and buffers of construction unit
        ``unit`` (a name of :attr:`units`), as the model built on the CPU holds them."""
        if unit not in self._unit_of:
            raise ValueError(f"InitReplay.unit_values: argument 'unit' expected one of {list(self._unit_of)}, "
                             f"got {unit!r}")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._states[unit])
            built = _rebuild(self._unit_of[unit])
            values = {f"{unit}.{n}": t.detach() for n, t in
                      itertools.chain(built.named_parameters(), built.named_buffers())}
            with torch.no_grad():
                for name, func, args, kwargs, state in self._events:
                    if name in values:
                        torch.set_rng_state(state)
                        func(values[name], *args, **kwargs)
        for name, t in values.items():
            if t.is_floating_point() and bool(t.isnan().any()):
                raise ValueError(f"InitReplay: {name!r} is not written by any reset_parameters() of its module or "
                                 f"its parents, so it cannot be initialized off the meta device")
        return values

    def unit_of(self, name: str) -> str:
        """The construction unit holding parameter or buffer ``name`` (a qualified name of the model)."""
        for unit, _ in self.units:
            if name.startswith(unit + "."):
                return unit
        raise ValueError(f"InitReplay.unit_of: {name!r} belongs to no unit of {[u for u, _ in self.units]}")
