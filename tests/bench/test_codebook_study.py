"""The codebook study script: its bootstrap schedule and its argument checks."""

from __future__ import annotations

import pytest

from benchmarks import codebook_study
from lightning_holograd.callbacks import ADCBootstrap


@pytest.mark.parametrize(("bootstrap", "refresh"), [(10, 0), (10, 50), (3, 5), (1, 1)])
def test_study_schedule_is_adc_bootstraps(bootstrap, refresh):
    callback = ADCBootstrap(bootstrap, refresh)
    for step in range(400):
        assert codebook_study.is_true_step(step, bootstrap, refresh) == callback.is_true_gradient_step(step)


@pytest.mark.parametrize("argv", [["--variants", "dense,nope"], ["--steps", "0"], ["--own-variants", "x"]])
def test_study_refuses_bad_arguments_before_any_run(argv, capsys):
    with pytest.raises(SystemExit):
        codebook_study.main(argv)
    assert "bad --variants" in capsys.readouterr().err
