"""The recurrent baseline of the recall probes: :class:`~gdn2ts.models.encoder.GRUEncoder` (the stream encoder
with a GRU mixer in each block) of the same state size per layer as a GDN-2 encoder."""

from __future__ import annotations

from gdn2ts.models.encoder import EncoderConfig, GRUEncoder, StreamEncoder

__all__ = ["GRUEncoder", "encoder_state_floats"]


def encoder_state_floats(config: EncoderConfig) -> int:
    """Floats one stream carries per layer in a :class:`StreamEncoder`: the mixer's recurrent state
    ``H * K * V`` plus its conv tail ``(2 * H * K + H * V) * (conv_size - 1)`` (the last output and time are
    per stream, not per layer, and the GRU baseline carries them too).

    Example:
        >>> encoder_state_floats(EncoderConfig(n_channels=3, num_heads=2, head_dim=8))
        272
    """
    enc = StreamEncoder(config)
    mixer = enc.mixers[0].config
    recurrent = mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim
    return recurrent + mixer.conv_channels * (mixer.conv_size - 1)
