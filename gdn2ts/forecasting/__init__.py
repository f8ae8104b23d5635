"""Forecasting adapters: a GDN-2 forecaster fit with Lightning on polars data, a pytorch-forecasting model, the
ETT loader and the long-horizon benchmark harness. This package may import lightning and pytorch-forecasting; the
core (ops, layers, models, streaming) never does."""

# pytorch-forecasting takes seconds to import: its adapter loads on first use of one of these names
_PF_EXPORTS = {"GDN2Model": "gdn2ts.forecasting.pf", "vic_elec_datasets": "gdn2ts.forecasting.pf_data",
               "vic_elec_frame": "gdn2ts.forecasting.pf_data"}
# the Lightning path (importing lightning takes seconds too) loads the same way, through the same table
_PF_EXPORTS.update({name: f"gdn2ts.forecasting.{module}" for module, names in {
    "lightning": ("ForecastModule", "ForecastDataModule", "ModelConfig", "TrainConfig", "evaluate"),
    "fit": ("FitConfig", "load_module", "predict_frame"),
    "frames": ("fit_forecaster", "forecast"), "rolling": ("backtest", "cross_validation"),
    "data": ("DataConfig", "DataError", "load_ett", "download_ett", "load_table"),
    "baselines": ("DLinear", "DLinearConfig", "GRUForecaster", "GRUConfig"),
    "plot": ("plot_forecast",), "bench": ("run_bench",),
    "metrics": ("forecast_metrics", "summarize_metrics", "seasonal_scale"),
    "conformal": ("calibrate", "apply_calibration", "conformalize")}.items() for name in names})


def __getattr__(name: str):
    if name in _PF_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_PF_EXPORTS[name]), name)
    raise AttributeError(f"module 'gdn2ts.forecasting' has no attribute {name!r}")
