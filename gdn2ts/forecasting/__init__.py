"""Forecasting adapters: a GDN-2 forecaster fit with Lightning on polars data, a pytorch-forecasting model, the
ETT loader and the long-horizon benchmark harness. This package may import lightning and pytorch-forecasting; the
core (ops, layers, models, streaming) never does."""
