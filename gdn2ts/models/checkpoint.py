"""Encoder checkpoints: the weights as safetensors; the configuration, the data scaling, the time axis and the
bounds of plausible input in its metadata.

A checkpoint is one ``.safetensors`` file. Its tensors are the encoder's ``state_dict`` (plus, with per-stream
scaling, ``scaling.loc`` and ``scaling.scale`` ``[streams, channels]``); its string metadata holds a format tag,
the :class:`EncoderConfig` as JSON, the global :class:`Scaler` (per-channel location and scale fit on the training
rows), the covariate names, the length of one time unit in seconds and a SHA-256 over the tensor bytes, so a
damaged file is recognised rather than loaded. Format v2 adds the user's timestamp type (:class:`TimeSpec`), the
per-stream scaling's stream ids, the input bounds (:class:`Limits`), the data's id and time column names and a free
``info`` record (JSON: how it was trained). Format v3 is v2 with the encoder's weights named by its blocks
(``blocks.i.mixer``, ``blocks.i.mlp.gate_proj`` ...; :func:`~gdn2ts.models.encoder.upgrade_state_dict` renames
the parallel lists of v1 and v2, ``mixers.i`` ... ``mlps.i.gate_up``, on load). Version-1 and version-2 files still
load (v1: numbers in model time units, global scaling); any other file is refused by name. Nothing is pickled:
loading reads tensors and JSON only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gdn2ts.models.encoder import EncoderConfig, StreamEncoder, upgrade_state_dict
from gdn2ts.models.units import Limits, StreamScales, TimeSpec, format_duration

__all__ = ["Scaler", "Checkpoint", "CheckpointError", "save_checkpoint", "write_checkpoint", "load_checkpoint",
           "TimeSpec", "StreamScales", "Limits", "FORMAT"]

FORMAT = "gdn2ts.encoder.v3"
FORMATS = ("gdn2ts.encoder.v1", "gdn2ts.encoder.v2", FORMAT)
_V2_METADATA = FORMATS[1:]  # formats with the time spec, per-stream scaling, limits, columns and info
_SCALING = ("scaling.loc", "scaling.scale")


class CheckpointError(ValueError):
    """A checkpoint file is missing, not a checkpoint, of another format, or damaged."""


@dataclass(frozen=True)
class Scaler:
    """Per-channel affine scaling: the model sees ``(x - loc) / scale``.

    Example:
        >>> import torch
        >>> s = Scaler.fit(["load", "temp"], torch.tensor([[1.0, 10.0], [3.0, float("nan")], [5.0, 30.0]]))
        >>> s.loc, s.scale
        ((3.0, 20.0), (1.632993161855452, 10.0))
        >>> s.inverse(s.transform(torch.tensor([[4.0, 15.0]]))).tolist()
        [[4.0, 15.0]]
    """

    channels: tuple[str, ...]
    """Channel names, in the encoder's channel order."""
    loc: tuple[float, ...]
    """Location per channel (the training mean)."""
    scale: tuple[float, ...]
    """Positive scale per channel (the training standard deviation)."""

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "loc", tuple(float(v) for v in self.loc))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        n = len(self.channels)
        if n == 0 or len(set(self.channels)) != n or not all(isinstance(c, str) and c for c in self.channels):
            raise ValueError(f"Scaler: 'channels' expected distinct non-empty names, got {self.channels!r}")
        if len(self.loc) != n or len(self.scale) != n:
            raise ValueError(f"Scaler: 'loc' and 'scale' expected {n} values each, got {len(self.loc)} and "
                             f"{len(self.scale)}")
        if not all(math.isfinite(v) for v in self.loc):
            raise ValueError(f"Scaler: 'loc' expected finite values, got {self.loc}")
        if not all(math.isfinite(v) and v > 0 for v in self.scale):
            raise ValueError(f"Scaler: 'scale' expected positive finite values, got {self.scale}")

    @classmethod
    def fit(cls, channels, values: torch.Tensor) -> Scaler:
        """Mean and standard deviation of each channel of ``values`` ``[..., channels]`` over its non-NaN
        entries (a constant or empty channel gets scale 1)."""
        flat = values.reshape(-1, values.shape[-1]).double()
        present = ~torch.isnan(flat)
        count = present.sum(0)
        if bool((count == 0).any()):
            empty = [c for c, n in zip(channels, count, strict=True) if n == 0]
            raise ValueError(f"Scaler.fit: channels {empty} have no observed value")
        zeroed = torch.where(present, flat, 0.0)
        mean = zeroed.sum(0) / count
        var = torch.where(present, (flat - mean) ** 2, 0.0).sum(0) / count
        std = var.sqrt()
        return cls(tuple(channels), tuple(mean.tolist()), tuple(torch.where(std > 0, std, 1.0).tolist()))

    def transform(self, values: torch.Tensor) -> torch.Tensor:
        """``[..., channels]`` raw values to model units (NaN stays NaN)."""
        loc, scale = self._tensors(values)
        return (values - loc) / scale

    def inverse(self, values: torch.Tensor) -> torch.Tensor:
        """``[..., channels]`` model units back to raw values."""
        loc, scale = self._tensors(values)
        return values * scale + loc

    def _tensors(self, values):
        if values.shape[-1] != len(self.channels):
            raise ValueError(f"Scaler: values expected {len(self.channels)} channels on the last axis, got shape "
                             f"{tuple(values.shape)}")
        return (torch.tensor(self.loc, dtype=values.dtype, device=values.device),
                torch.tensor(self.scale, dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the encoder and what turns the user's rows into its inputs and its outputs back."""

    encoder: StreamEncoder
    """The model, in eval mode, on the CPU."""
    scaler: Scaler
    """Channel names and global scaling; ``scaler.channels`` are the encoder's channels in order."""
    covariates: tuple[str, ...] = ()
    """Covariate column names in the encoder's order."""
    time_unit_seconds: float = 1.0
    """Seconds in one unit of the encoder's timestamps (3600: timestamps count hours)."""
    time: TimeSpec | None = None
    """The user's timestamp type; None (version-1 files): numbers in model time units (date-times accepted)."""
    stream_scales: StreamScales | None = None
    """Per-stream scaling of the streams seen in training (others use ``scaler``); None: global scaling."""
    limits: Limits = field(default_factory=Limits)
    """Bounds of plausible input (values in model units, timestamp jumps in time units)."""
    columns: tuple[str, str] = ("stream", "time")
    """The data's stream id and timestamp column names."""
    info: dict = field(default_factory=dict)
    """How the checkpoint was made (JSON values: the recipe, the data, validation errors)."""

    def __post_init__(self):
        cfg = self.encoder.config
        if len(self.scaler.channels) != cfg.n_channels:
            raise ValueError(f"Checkpoint: scaler has {len(self.scaler.channels)} channels, the encoder "
                             f"{cfg.n_channels}")
        if len(self.covariates) != cfg.n_covariates or not all(isinstance(c, str) and c for c in self.covariates):
            raise ValueError(f"Checkpoint: {len(self.covariates)} covariate names for an encoder with "
                             f"{cfg.n_covariates} covariates")
        if not (math.isfinite(self.time_unit_seconds) and self.time_unit_seconds > 0):
            raise ValueError(f"Checkpoint: 'time_unit_seconds' expected a positive number, got "
                             f"{self.time_unit_seconds}")
        if self.time is not None and self.time.unit_seconds != self.time_unit_seconds:
            raise ValueError(f"Checkpoint: the time spec's unit ({self.time.unit_seconds} s) differs from "
                             f"'time_unit_seconds' ({self.time_unit_seconds})")
        if self.stream_scales is not None and self.stream_scales.loc and \
                len(self.stream_scales.loc[0]) != cfg.n_channels:
            raise ValueError(f"Checkpoint: per-stream scaling has {len(self.stream_scales.loc[0])} channels, the "
                             f"encoder {cfg.n_channels}")
        if len(self.columns) != 2 or not all(isinstance(c, str) and c for c in self.columns):
            raise ValueError(f"Checkpoint: 'columns' expected (id column, time column), got {self.columns!r}")
        object.__setattr__(self, "columns", tuple(self.columns))

    @property
    def time_spec(self) -> TimeSpec:
        """The user's timestamp type (version-1 files: numbers counted in the model's time unit)."""
        if self.time is not None:
            return self.time
        return TimeSpec("number", self.time_unit_seconds, number_unit=format_duration(self.time_unit_seconds))

    @property
    def scaling(self) -> str:
        """``per_stream`` or ``global``."""
        return "global" if self.stream_scales is None else "per_stream"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, encoder: StreamEncoder, scaler: Scaler, covariates=(),
                    time_unit_seconds: float | None = None, *, time: TimeSpec | None = None,
                    stream_scales: StreamScales | None = None, limits: Limits | None = None,
                    columns: tuple[str, str] = ("stream", "time"), info: dict | None = None) -> Path:
    """Write ``encoder`` with its configuration, ``scaler`` and how the data map onto it to ``path``.

    ``time_unit_seconds`` defaults to ``time.unit_seconds`` (1.0 without ``time``).

    Example:
        >>> import tempfile, torch
        >>> from gdn2ts.models import EncoderConfig, StreamEncoder
        >>> enc = StreamEncoder(EncoderConfig(n_channels=2, hidden_size=16, head_dim=8, horizon=3))
        >>> path = save_checkpoint(tempfile.mkdtemp() + "/model.safetensors", enc,
        ...                        Scaler(("load", "temp"), (0.0, 20.0), (1.0, 5.0)),
        ...                        time=TimeSpec("datetime", 3600.0, time_zone="Europe/Paris"))
        >>> ckpt = load_checkpoint(path)
        >>> ckpt.scaler.channels, ckpt.time_unit_seconds, ckpt.time.time_zone, ckpt.encoder.config == enc.config
        (('load', 'temp'), 3600.0, 'Europe/Paris', True)
    """
    if not isinstance(encoder, StreamEncoder):
        raise ValueError(f"save_checkpoint: 'encoder' expected a StreamEncoder, got {type(encoder).__name__}")
    cfg = encoder.config
    if len(scaler.channels) != cfg.n_channels:
        raise ValueError(f"save_checkpoint: scaler has {len(scaler.channels)} channels, the encoder "
                         f"{cfg.n_channels}")
    covariates = tuple(covariates)
    if len(covariates) != cfg.n_covariates or not all(isinstance(c, str) and c for c in covariates):
        raise ValueError(f"save_checkpoint: 'covariates' expected {cfg.n_covariates} names, got {list(covariates)}")
    if time_unit_seconds is None:
        time_unit_seconds = 1.0 if time is None else time.unit_seconds
    if not (math.isfinite(time_unit_seconds) and time_unit_seconds > 0):
        raise ValueError(f"save_checkpoint: 'time_unit_seconds' expected a positive number, got {time_unit_seconds}")
    ckpt = Checkpoint(encoder, scaler, covariates, float(time_unit_seconds), time, stream_scales,
                      Limits() if limits is None else limits, tuple(columns), dict(info or {}))
    return write_checkpoint(path, ckpt)


def write_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write a :class:`Checkpoint` (format v3) to ``path``, atomically (beside it, then renamed)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.encoder.state_dict().items()}
    scales = ckpt.stream_scales
    if scales is not None:
        tensors[_SCALING[0]] = torch.tensor(scales.loc, dtype=torch.float64).reshape(len(scales.streams), -1)
        tensors[_SCALING[1]] = torch.tensor(scales.scale, dtype=torch.float64).reshape(len(scales.streams), -1)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(dataclasses.asdict(ckpt.encoder.config)),
        "scaler": json.dumps(dataclasses.asdict(ckpt.scaler)),
        "covariates": json.dumps(list(ckpt.covariates)),
        "time_unit_seconds": repr(float(ckpt.time_unit_seconds)),
        "time": json.dumps(None if ckpt.time is None else ckpt.time.to_json()),
        "scaling": json.dumps({"mode": ckpt.scaling, "streams": None if scales is None else list(scales.streams)}),
        "limits": json.dumps(ckpt.limits.to_json()),
        "columns": json.dumps(list(ckpt.columns)),
        "info": json.dumps(ckpt.info),
        "sha256": _digest(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target and rename, so a crash never leaves a half-written checkpoint under the name
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and JSON only, never unpickled).

    Raises :class:`CheckpointError` naming the file and the problem: missing, not safetensors, another format,
    a tensor that is missing, extra or of the wrong shape, or bytes that fail the stored SHA-256.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        tensors = load_file(str(path))
        # safetensors layout: an 8-byte little-endian header length, then the JSON header holding the metadata
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a safetensors file ({e})") from None
    fmt = metadata.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {fmt!r}, expected {FORMAT!r} (or the older "
                              f"{' or '.join(map(repr, FORMATS[:-1]))}); it was not written by gdn2ts's "
                              f"save_checkpoint")
    try:
        raw = json.loads(metadata["config"])
        raw["quantiles"] = tuple(raw["quantiles"])
        config = EncoderConfig(**raw)
        scaler = Scaler(**json.loads(metadata["scaler"]))
        covariates = tuple(json.loads(metadata["covariates"]))
        time_unit_seconds = float(metadata["time_unit_seconds"])
        extra = _v2_metadata(metadata, tensors, scaler) if fmt in _V2_METADATA else {}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has unreadable metadata ({type(e).__name__}: {e})") from None
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {str(path)!r} fails its SHA-256 check: the weights are damaged")
    for name in _SCALING:
        tensors.pop(name, None)
    if fmt != FORMAT:
        upgrade_state_dict(tensors)
    encoder = StreamEncoder(config)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        # keep the stored precision (a float64 model stays float64), so the round trip is bit-exact
        encoder = encoder.to(dtypes.pop())
    expected = encoder.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not match its configuration: missing tensors "
                              f"{missing}, unexpected tensors {unexpected}")
    for name, t in expected.items():
        if tensors[name].shape != t.shape:
            raise CheckpointError(f"checkpoint {str(path)!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                  f"the configuration expects {tuple(t.shape)}")
    encoder.load_state_dict(tensors)
    try:
        return Checkpoint(encoder.eval(), scaler, covariates, time_unit_seconds, **extra)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {e}") from None


def _v2_metadata(metadata: dict, tensors: dict[str, torch.Tensor], scaler: Scaler) -> dict:
    time = json.loads(metadata["time"])
    scaling = json.loads(metadata["scaling"])
    scales = None
    if scaling["mode"] == "per_stream":
        loc, scale = (tensors[name] for name in _SCALING)
        streams = scaling["streams"]
        if tuple(loc.shape) != (len(streams), len(scaler.channels)) or loc.shape != scale.shape:
            raise ValueError(f"per-stream scaling tensors {tuple(loc.shape)} do not match {len(streams)} streams "
                             f"of {len(scaler.channels)} channels")
        scales = StreamScales(tuple(streams), loc.tolist(), scale.tolist())
    elif scaling["mode"] != "global":
        raise ValueError(f"scaling mode {scaling['mode']!r} is neither 'global' nor 'per_stream'")
    return {"time": None if time is None else TimeSpec.from_json(time), "stream_scales": scales,
            "limits": Limits.from_json(json.loads(metadata["limits"])),
            "columns": tuple(json.loads(metadata["columns"])), "info": json.loads(metadata["info"])}
