"""`dinofuse train --fit-minutes M`: whole epochs fitted to a time budget by a timed trial."""

import json
import re

import pytest

from dinofuse.engine.cli import main
from dinofuse.engine.config import load_config
from dinofuse.engine.time_budget import fitted_epochs, shrink_schedule
from test_cli import folder  # noqa: F401  (the image-folder fixture)
from test_train import TINY


def test_fitted_epochs_count_each_epochs_steps_and_its_save():
    # 10 steps of 0.5 s and a 5 s save: 10 s an epoch
    assert fitted_epochs(1.0, 100, 10, 0.5, 5.0) == 6
    assert fitted_epochs(1.0, 100, 10, 0.5, 0.0) == 12
    assert fitted_epochs(59.9 / 60, 100, 10, 0.5, 5.0) == 5  # whole epochs only
    assert fitted_epochs(1.0, 4, 10, 0.5, 5.0) == 4  # never more than planned
    assert fitted_epochs(0.01, 4, 10, 0.5, 5.0) == 1  # at least one


def test_a_shorter_run_keeps_the_planned_runs_shape():
    cfg = load_config("default_gpu")
    assert (cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.warmup_teacher_temp_epochs,
            cfg.optim.freeze_last_layer) == (48, 6.0, 15, 1)
    third = shrink_schedule(cfg, 16).optim
    assert (third.epochs, third.warmup_epochs, third.warmup_teacher_temp_epochs,
            third.freeze_last_layer) == (16, 2.0, 5, 1)
    half = shrink_schedule(cfg, 24).optim
    assert (half.warmup_epochs, half.warmup_teacher_temp_epochs) == (3.0, 8)  # 7.5 rounds to even
    tiny = shrink_schedule(cfg, 1).optim
    assert (tiny.warmup_epochs, tiny.warmup_teacher_temp_epochs, tiny.freeze_last_layer) == (0.125, 0, 1)
    assert shrink_schedule(cfg, 48) == cfg
    unfrozen = load_config("default_gpu", ["optim.freeze_last_layer=0", "optim.epochs=10"])
    assert shrink_schedule(unfrozen, 5).optim.freeze_last_layer == 0
    long_freeze = load_config("default_gpu", ["optim.freeze_last_layer=4"])
    assert shrink_schedule(long_freeze, 24).optim.freeze_last_layer == 2
    assert cfg.optim.epochs == 48  # the input is left as it was


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_fitted_run_trains_as_its_saved_config_and_resumes_without_refitting(
        folder, tmp_path, capsys, reference_path):  # noqa: F811
    """The trial leaves no trace in the run: a fitted run, interrupted and resumed, gives the
    losses of a run started from the config.toml it saved (the fitted epochs and warm-up).
    The plain-PyTorch loss and EMA (`reference_path`): interpreted kernels would make every
    step ~1 s and the fit a single epoch."""
    planned = [o for o in TINY if not o.startswith("optim.epochs")] + ["optim.epochs=40"]
    fitted = tmp_path / "fitted"
    # 1.2 s: a few epochs of 4 tiny steps (and a save) here, fewer than 40
    # --auto-resume from the start: a trial that left a checkpoint here would be resumed from
    args = ["train", "--data", str(folder), "--output-dir", str(fitted), "--quiet",
            "--auto-resume", *planned]
    assert main([*args, "--fit-minutes", "0.02", "--max-steps", "3"]) == 0
    said = re.search(r"fit to 0.02 min: (\d+) of 40 epochs \(4 steps of [\d.]+ ms and a [\d.]+ s "
                     r"save each, [\d.]+ s per epoch, measured\)", capsys.readouterr().out)
    assert said, "the fit is reported"
    epochs = int(said.group(1))
    saved = load_config(fitted / "config.toml")
    assert 1 <= epochs < 40 and saved.optim.epochs == epochs
    assert saved.optim.warmup_epochs == pytest.approx(0.5 * epochs / 40)
    # a relaunch of the same command resumes with the fitted epochs, even when asked for more
    assert main([*args, "--fit-minutes", "60"]) == 0
    assert f"resuming, with the {epochs} epochs fitted at the start" in capsys.readouterr().out
    by_hand = tmp_path / "by_hand"
    assert main(["train", "--config", str(fitted / "config.toml"), "--output-dir", str(by_hand),
                 "--quiet"]) == 0
    assert len(_losses(by_hand)) == 4 * epochs
    assert _losses(fitted) == _losses(by_hand)


@pytest.mark.parametrize("extra, message", [
    (["--fit-minutes", "0"], "--fit-minutes must be a positive number of minutes; got 0"),
    (["--fit-minutes", "-1"], "--fit-minutes must be a positive number of minutes; got -1"),
])
def test_a_bad_budget_gets_one_line(extra, message, folder, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--data", str(folder), "--output-dir", str(tmp_path), *TINY, *extra]) == 2
    assert capsys.readouterr().err.strip() == f"dinofuse train: error: {message}"

