"""gdn2ts: Gated DeltaNet-2 as an exact, fast recurrent layer for time series and language models."""

__version__ = "0.1.0"
