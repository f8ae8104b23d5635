"""LM training checkpoints, full or sharded, and reading either back.

A **full** checkpoint is one file written by rank 0 (``torch.save`` of plain values and tensors, read with
``torch.load(weights_only=True)``): ``model`` (the whole weights by name), ``optimizer`` (AdamW's state by
parameter name and its groups), ``scheduler``, ``data``, ``step``, ``tokens``, ``world_size``, ``config``.

A **sharded** checkpoint is a folder written by every process at once through torch distributed checkpoint
(DCP) in safetensors files, so that no process gathers the model:

- ``shard-<r>-model-<u>-of-<n>.safetensors``: process ``r``'s pieces of the weights (keys ``model/<name>``) and of
  AdamW's state (``optimizer/<name>/<exp_avg | exp_avg_sq | step>``) of unit ``u`` of ``n`` (a top-level module,
  or one element of a module list: the embedding, each block, the head), each piece with its offset in the whole
  tensor in the file's header (DCP's Hugging Face storage). A file is serialized in memory before it is written:
  one file per unit bounds that to one block's shard;
- ``state.json``: the rest, plain values (the same keys as a full checkpoint but ``model``, plus the
  optimizer's parameter groups), written last: a folder without it is incomplete.

Any number of processes reads it back (DCP reads each process's pieces of every tensor from whichever files hold
them), which is what lets a run resume on another number of devices. Nothing is unpickled: safetensors and JSON.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> folder = tempfile.mkdtemp()
    >>> model = nn.Linear(3, 2)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> model(torch.randn(4, 3)).sum().backward(); opt.step()
    >>> save_sharded(f"{folder}/a.ckpt", model, opt, {"step": 1})
    >>> other = nn.Linear(3, 2)
    >>> other_opt = torch.optim.AdamW(other.parameters())
    >>> load_sharded(f"{folder}/a.ckpt", other, other_opt)["step"]
    1
    >>> torch.equal(other.weight, model.weight), read_checkpoint(f"{folder}/a.ckpt")["model"].keys()
    (True, dict_keys(['bias', 'weight']))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

__all__ = ["STATE_FILE", "latest", "load_full", "load_sharded", "peek", "read_checkpoint", "replace", "save_full",
           "save_sharded"]

STATE_FILE = "state.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _alone():
    # DCP warns on every save and load outside a process group that it assumes one process: that is the intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _flat(model_sd: dict, optim_sd: dict) -> dict[str, torch.Tensor]:
    flat = {f"model/{name}": t for name, t in model_sd.items()}
    for name, state in optim_sd["state"].items():
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"save_sharded: optimizer state {name!r}/{key!r} is a {type(t).__name__}, "
                                 f"expected tensors only")
            flat[f"optimizer/{name}/{key}"] = t
    return flat


def _unit(key: str) -> str:
    # "model/blocks.3.mixer.q_proj.weight" -> "blocks.3"; "optimizer/embed.weight/exp_avg" -> "embed"
    parts = key.split("/")[1].split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def save_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plain: dict) -> None:
    """Write a sharded checkpoint folder at ``path`` (module docstring); every process calls it. ``model`` is the
    model as sharded (FSDP1, FSDP2, DDP's module or a plain module), ``optimizer`` the torch optimizer, ``plain``
    the JSON values for ``state.json`` (written by rank 0 after every process's files)."""
    path = Path(path)
    if _rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat = _flat(model_sd, optim_sd)
    units = {u: i for i, u in enumerate(dict.fromkeys(_unit(k) for k in flat), start=1)}
    writer = HuggingFaceStorageWriter(str(path), fqn_to_index_mapping={k: units[_unit(k)] for k in flat},
                                      save_distributed=True)
    with _alone():
        dcp.save(flat, storage_writer=writer, no_dist=not _distributed())
    _barrier()
    if _rank() == 0:
        state = {**plain, "optimizer_groups": optim_sd["param_groups"]}
        (path / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    _barrier()


def _check_folder(path: Path, op: str) -> dict:
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{op}: {str(path)!r} is not a complete sharded checkpoint (no {STATE_FILE}: the save "
                         f"that wrote it did not finish)")
    return json.loads((path / STATE_FILE).read_text())


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the weights and optimizer state of the sharded checkpoint ``path`` into ``model`` and ``optimizer``
    (sharded in any way, on any number of processes; every process calls it) and return its plain values."""
    path = Path(path)
    state = _check_folder(path, "load_sharded")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    flat = _flat(model_sd, optim_sd)
    try:
        with _alone():
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not _distributed())
    except (CheckpointException, ValueError, RuntimeError) as e:
        # DCP names the first missing or mismatched tensor on the last line of the failing process's traceback
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise ValueError(f"load_sharded: {str(path)!r} does not fit this model and optimizer: {reason}") from None
    groups = state.pop("optimizer_groups")
    fresh = optim_sd["param_groups"]
    if len(groups) != len(fresh) or any(g["params"] != f["params"] for g, f in zip(groups, fresh, strict=True)):
        raise ValueError(f"load_sharded: {str(path)!r} holds other optimizer parameter groups")
    # JSON gives lists where the optimizer keeps tuples (betas)
    optim_sd["param_groups"] = [{k: tuple(v) if isinstance(f.get(k), tuple) else v for k, v in g.items()}
                                for g, f in zip(groups, fresh, strict=True)]
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return state


def save_full(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plain: dict,
              cpu_offload: bool = False) -> None:
    """Write a full checkpoint file at ``path`` (module docstring): every process calls it (a sharded model is
    gathered), rank 0 writes. ``cpu_offload``: gather onto the CPU (for GPU runs; FSDP1's offload crashes on
    CPU tensors)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if _rank() == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd, **plain}, path)
    _barrier()


def _by_name(saved: dict, fresh: dict) -> dict:
    # a checkpoint of a plain optimizer.state_dict() numbers the parameters in the order of the groups: name them
    if all(isinstance(k, str) for k in saved["state"]) and all(
            isinstance(p, str) for g in saved["param_groups"] for p in g["params"]):
        return saved
    names = {i: n for g, f in zip(saved["param_groups"], fresh["param_groups"], strict=True)
             for i, n in zip(g["params"], f["params"], strict=True)}
    return {"state": {names[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}


def load_full(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the full checkpoint file ``path`` into ``model`` and ``optimizer`` (sharded in any way; every process
    calls it and reads the file) and return its plain values."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved, dict) or not {"model", "optimizer"} <= set(saved):
        raise ValueError(f"load_full: {str(path)!r} is not a training checkpoint (expected 'model' and 'optimizer')")
    _, fresh = get_state_dict(model, optimizer)
    try:
        groups = _by_name(saved["optimizer"], fresh)
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=groups,
                       options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"load_full: {str(path)!r} does not fit this model and optimizer: {e}") from None
    return {k: v for k, v in saved.items() if k not in ("model", "optimizer")}


def peek(path: str | Path) -> dict:
    """The plain values of a checkpoint (file or folder) without its tensors: ``config``, ``step``, ``data``..."""
    path = Path(path)
    if path.is_dir():
        return _check_folder(path, "peek")
    if not path.is_file():
        raise ValueError(f"peek: argument 'path' expected a checkpoint file or folder, got {str(path)!r}")
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in saved.items() if k not in ("model", "optimizer")} if isinstance(saved, dict) else {}


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint (file or sharded folder) as one dict with the whole weights under ``model`` (CPU tensors),
    for generation, evaluation and export; a sharded folder's optimizer state is left out."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not path.is_dir():
        raise ValueError(f"read_checkpoint: argument 'path' expected a checkpoint file or folder, got {str(path)!r}")
    state = _check_folder(path, "read_checkpoint")
    reader = HuggingFaceStorageReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    model = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model/")}
    with _alone():
        dcp.load(model, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    state["model"] = {k[len("model/"):]: model[k] for k in sorted(model)}
    state.pop("optimizer_groups", None)
    return state


def replace(new: Path, path: Path) -> None:
    """Put ``new`` (a file or folder) at ``path`` (a file, a folder or nothing). ``path`` is first renamed
    ``<path>.old`` when it exists, so a crash at any point leaves a complete checkpoint at ``path`` or at
    ``<path>.old`` (see :func:`latest`)."""
    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def latest(out: str | Path, name: str = "last.ckpt") -> Path | None:
    """``out/<name>``, or ``out/<name>.old`` when a save was cut off between its two renames, or None."""
    for candidate in (Path(out) / name, Path(out) / f"{name}.old"):
        if candidate.exists():
            return candidate
    return None
