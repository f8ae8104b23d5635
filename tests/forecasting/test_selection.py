"""The validation-only selection rule of docs/forecast-selection.md: the score by hand, the cheaper form within the
tie margin, cells missing a candidate left out, and the series it reads."""

from __future__ import annotations

import math

import pytest

from gdn2ts.forecasting.selection import SERIES, choose, fractions_borders, load_series_frame


def _rows(table):
    return [{"series": s, "horizon": h, "candidate": c, "val_mse": v, "fit_cpu_seconds": t}
            for (s, h), cands in table.items() for c, (v, t) in cands.items()]


def test_the_score_is_the_geometric_mean_of_validation_ratios_to_dlinear():
    rows = _rows({("a", 96): {"dlinear": (0.5, 1), "x": (0.4, 10), "y": (0.6, 2)},
                  ("b", 96): {"dlinear": (2.0, 1), "x": (2.5, 10), "y": (1.8, 2)}})
    out = choose(rows)
    assert out["scores"]["x"] == pytest.approx(math.sqrt(0.8 * 1.25))
    assert out["scores"]["y"] == pytest.approx(math.sqrt(1.2 * 0.9))
    assert out["chosen"] == out["best_score"] == "x" and out["cpu_seconds"] == {"x": 20, "y": 4}


def test_a_cheaper_form_within_the_margin_wins_and_outside_it_loses():
    near = _rows({("a", 96): {"dlinear": (1.0, 1), "slow": (0.900, 100), "fast": (0.904, 10)}})
    assert choose(near)["chosen"] == "fast" and choose(near)["best_score"] == "slow"
    far = _rows({("a", 96): {"dlinear": (1.0, 1), "slow": (0.900, 100), "fast": (0.906, 10)}})
    assert choose(far)["chosen"] == "slow"


def test_cells_without_every_candidate_are_left_out_and_none_is_an_error():
    rows = _rows({("a", 96): {"dlinear": (1.0, 1), "x": (0.5, 1), "y": (0.6, 1)},
                  ("b", 96): {"dlinear": (1.0, 1), "x": (0.1, 1)}})
    assert choose(rows)["cells"] == 1 and choose(rows)["chosen"] == "x"
    with pytest.raises(ValueError, match="every candidate"):
        choose(_rows({("a", 96): {"x": (0.5, 1)}}))


def test_the_series_load_with_their_channels_and_borders():
    assert fractions_borders(16080) == (11256, 12864, 16080)
    for name in ("vic_elec", "EPF_BE"):
        frame = load_series_frame(name)
        assert frame.columns == ["date", *SERIES[name].channels] and frame["date"].is_sorted()
        assert frame.null_count().sum_horizontal().item() == 0
    with pytest.raises(ValueError, match="unknown series"):
        load_series_frame("ETTh2")


def test_the_bench_ships_the_chosen_form_and_keeps_the_candidates_base():
    from dataclasses import replace

    from gdn2ts.forecasting.bench import MODEL_DEFAULTS
    from gdn2ts.forecasting.lightning import TrainConfig
    from gdn2ts.forecasting.selection import CANDIDATES, _configs

    model, train = _configs(CANDIDATES["ci_fast"])
    shipped_model, shipped_train = MODEL_DEFAULTS["gdn2_ci"]
    assert shipped_model == model and replace(TrainConfig(accelerator="cpu", **shipped_train)) == train
    overlap_model, overlap_train = MODEL_DEFAULTS["gdn2_ci_overlap"]
    assert (overlap_model.patch_stride, overlap_train) == (8, {"lr": 1e-3, "recurrent_lr_scale": 0.3})
