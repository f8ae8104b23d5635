"""Models built from the GDN-2 layers."""

from gdn2ts.models.encoder import EncoderConfig, EncoderState, StreamEncoder

__all__ = ["EncoderConfig", "EncoderState", "StreamEncoder"]
