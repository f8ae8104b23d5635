"""Encoder checkpoints: bit-exact round trips, no unpickling, and named errors for wrong or damaged files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import Checkpoint, CheckpointError, Scaler, load_checkpoint, save_checkpoint

CFG = EncoderConfig(n_channels=2, n_covariates=1, hidden_size=16, num_heads=2, head_dim=8, horizon=3,
                    quantiles=(0.05, 0.5, 0.95), time_unit=2.5, variant="kda")
SCALER = Scaler(("load", "temp"), (100.0, 12.5), (20.0, 4.0))


def _saved(tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    enc = StreamEncoder(CFG).to(dtype)
    path = save_checkpoint(tmp_path / "m.safetensors", enc, SCALER, ("hour_sin",), time_unit_seconds=900.0)
    return enc, path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    from gdn2ts.streaming import model_fingerprint

    enc, path = _saved(tmp_path, dtype)
    ckpt = load_checkpoint(path)
    assert ckpt.encoder.config == CFG and ckpt.scaler == SCALER
    assert ckpt.covariates == ("hour_sin",) and ckpt.time_unit_seconds == 900.0
    before, after = enc.state_dict(), ckpt.encoder.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    assert model_fingerprint(enc) == model_fingerprint(ckpt.encoder)
    values = torch.randn(2, 7, 2, dtype=dtype)
    times = torch.arange(7.0, dtype=torch.float64).expand(2, 7)
    covs = torch.randn(2, 7, 1, dtype=dtype)
    assert torch.equal(enc.eval()(values, times, covs)["forecast"], ckpt.encoder(values, times, covs)["forecast"])


def test_load_never_unpickles(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    assert load_checkpoint(path).scaler == SCALER


def test_missing_and_non_safetensors_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(pickled)


def test_other_format_is_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has format 'pt', expected .gdn2ts.encoder.v3."):
        load_checkpoint(other)


def test_damaged_weights_fail_the_checksum(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # one bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)


def _rewrite_metadata(path, **changes):
    tensors = load_file(str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


def test_config_that_does_not_match_the_weights(tmp_path):
    _, path = _saved(tmp_path)
    cfg = json.loads(json.dumps({**CFG.__dict__, "hidden_size": 32}))
    _rewrite_metadata(path, config=json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* the configuration expects"):
        load_checkpoint(path)


def test_unreadable_metadata(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite_metadata(path, scaler=json.dumps({"channels": ["load"], "loc": [0.0], "scale": [-1.0]}))
    with pytest.raises(CheckpointError, match="unreadable metadata.*'scale' expected positive"):
        load_checkpoint(path)
    _rewrite_metadata(path, scaler="{not json")
    with pytest.raises(CheckpointError, match="unreadable metadata"):
        load_checkpoint(path)


def test_save_checks_its_arguments(tmp_path):
    enc = StreamEncoder(CFG)
    with pytest.raises(ValueError, match="scaler has 1 channels, the encoder 2"):
        save_checkpoint(tmp_path / "a.safetensors", enc, Scaler(("x",), (0.0,), (1.0,)), ("c",))
    with pytest.raises(ValueError, match="'covariates' expected 1 names"):
        save_checkpoint(tmp_path / "a.safetensors", enc, SCALER, ())
    with pytest.raises(ValueError, match="'encoder' expected a StreamEncoder"):
        save_checkpoint(tmp_path / "a.safetensors", torch.nn.Linear(2, 2), SCALER, ("c",))
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(ValueError, match="covariate names"):
        Checkpoint(enc, SCALER, (), 1.0)


def test_scaler_validation_and_fit():
    with pytest.raises(ValueError, match="'scale' expected positive"):
        Scaler(("a",), (0.0,), (0.0,))
    with pytest.raises(ValueError, match="distinct"):
        Scaler(("a", "a"), (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\['b'\] have no observed value"):
        Scaler.fit(["a", "b"], torch.tensor([[1.0, float("nan")]]))
    s = Scaler.fit(["a", "b"], torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    assert s.loc == (2.0, 5.0) and s.scale == (1.0, 1.0)  # a constant channel gets scale 1
    with pytest.raises(ValueError, match="expected 2 channels"):
        s.transform(torch.zeros(3))
