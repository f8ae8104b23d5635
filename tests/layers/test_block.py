"""One block for every model: weights of the earlier layouts (the encoder's parallel lists with a fused MLP, the
pytorch-forecasting model's fused MLP) load into the blocks with the same outputs, old checkpoints load, the
stream fingerprint is unchanged, and the GRU baseline is a mixer."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

from gdn2ts.layers.gru import GRUMixer
from gdn2ts.models import EncoderConfig, StreamEncoder
from gdn2ts.models.checkpoint import FORMAT, Scaler, _digest, load_checkpoint, save_checkpoint
from gdn2ts.streaming import model_fingerprint


def _old_names(sd: dict, prefix: str = "") -> dict:
    """The encoder's state_dict under the key names it had before blocks, written out by hand."""
    old = {}
    for key, t in sd.items():
        if not key.startswith("blocks."):
            old[key] = t
            continue
        i, part, rest = key[len("blocks."):].split(".", 2)
        if part == "mixer":
            old[f"mixers.{i}.{rest}"] = t
        elif part in ("mixer_norm", "mlp_norm"):
            old[f"{part}s.{i}.{rest}"] = t
        elif rest == "gate_proj.weight":
            old[f"mlps.{i}.gate_up.weight"] = torch.cat([t, sd[f"blocks.{i}.mlp.up_proj.weight"]])
        elif rest == "down_proj.weight":
            old[f"mlps.{i}.down.weight"] = t
    return old


def _old_fingerprint(model, old_sd) -> str:
    # the fingerprint as it was computed before blocks: over the state_dict's own (old) names
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(repr(model.config).encode())
    for name, t in sorted(old_sd.items()):
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _inputs():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, 9, 3, generator=g, dtype=torch.float64)
    values[0, 4] = float("nan")
    return values, torch.arange(9.0, dtype=torch.float64).expand(2, 9)


def test_encoder_loads_old_layout_with_the_same_outputs_and_fingerprint():
    cfg = EncoderConfig(n_channels=3, hidden_size=16, num_heads=2, head_dim=8, horizon=4, n_layers=2)
    torch.manual_seed(0)
    enc = StreamEncoder(cfg).double()
    old = _old_names(enc.state_dict())
    assert "mlps.1.gate_up.weight" in old and "mixers.0.A_log" in old and not any("blocks" in k for k in old)
    torch.manual_seed(1)
    other = StreamEncoder(cfg).double()
    other.load_state_dict(old)
    values, times = _inputs()
    assert torch.equal(other(values, times)["forecast"], enc(values, times)["forecast"])
    assert model_fingerprint(other) == model_fingerprint(enc) == _old_fingerprint(enc, old)


def test_old_checkpoint_loads(tmp_path):
    cfg = EncoderConfig(n_channels=3, hidden_size=16, num_heads=2, head_dim=8, horizon=4)
    enc = StreamEncoder(cfg).double().eval()
    path = save_checkpoint(tmp_path / "new.safetensors", enc, Scaler(("a", "b", "c"), (0.0,) * 3, (1.0,) * 3))
    with open(path, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert meta["format"] == FORMAT == "gdn2ts.encoder.v3"
    # the same checkpoint as version 2 wrote it: the old key names, its format tag, the digest over those tensors
    tensors = _old_names(enc.state_dict())
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={**meta, "format": "gdn2ts.encoder.v2", "sha256": _digest(tensors)})
    loaded = load_checkpoint(tmp_path / "old.safetensors").encoder
    values, times = _inputs()
    assert torch.equal(loaded(values, times)["forecast"], enc(values, times)["forecast"])
    assert model_fingerprint(loaded) == _old_fingerprint(enc, tensors)


def test_same_seed_same_initialization_as_the_fused_mlp():
    # the earlier _SwiGLU drew one [2h, d] matrix: its halves are the gate and up projections drawn in turn
    cfg = EncoderConfig(n_channels=2, hidden_size=8, num_heads=1, head_dim=4, n_layers=2)
    torch.manual_seed(5)
    a = StreamEncoder(cfg)
    torch.manual_seed(5)
    b = StreamEncoder(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    gate_up = _old_names(a.state_dict())["mlps.0.gate_up.weight"]
    assert gate_up.shape == (32, 8)


def test_pf_model_loads_fused_mlp_weights():
    import numpy as np
    import pandas as pd
    from pytorch_forecasting import TimeSeriesDataSet

    from gdn2ts.forecasting.pf import GDN2Model

    t = np.arange(30)
    df = pd.DataFrame({"time_idx": t, "series": "a", "y": np.sin(t / 3.0)})
    ds = TimeSeriesDataSet(df, time_idx="time_idx", target="y", group_ids=["series"], max_encoder_length=8,
                           max_prediction_length=3, time_varying_unknown_reals=["y"])
    model = GDN2Model.from_dataset(ds, hidden_size=16, num_heads=2, head_dim=8).eval()
    old = {}
    for key, t_ in model.state_dict().items():
        if ".mlp.up_proj." in key:
            continue
        if ".mlp.gate_proj." in key:
            old[key.replace("mlp.gate_proj", "gate_up")] = torch.cat([t_, model.state_dict()[
                key.replace("gate_proj", "up_proj")]])
        else:
            old[key.replace("mlp.down_proj", "down")] = t_
    assert "blocks.0.gate_up.weight" in old and "blocks.1.down.weight" in old
    other = GDN2Model.from_dataset(ds, hidden_size=16, num_heads=2, head_dim=8).eval()
    other.load_state_dict(old)
    x, _ = next(iter(ds.to_dataloader(batch_size=2, train=False)))
    assert torch.equal(other(x)["prediction"], model(x)["prediction"])


def test_gru_mixer_skips_masked_tokens_and_steps_as_it_runs():
    torch.manual_seed(0)
    mixer = GRUMixer(hidden_size=6, state_size=5).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    keep = torch.tensor([[True] * 7, [True, False, False, True, True, False, True]])
    y, state = mixer(x, attention_mask=keep)
    s = mixer.init_state(2)
    for t in range(7):
        y_t, s = mixer.step(x[:, t], s, mask=keep[:, t])
        assert torch.allclose(y_t, y[:, t], atol=1e-12)
    assert torch.allclose(s, state, atol=1e-12)
    # the kept tokens alone give the same state
    alone, _ = mixer(x[1:, keep[1]])
    assert torch.allclose(alone[0], y[1, keep[1]], atol=1e-12)
