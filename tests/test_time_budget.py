"""`dinofuse train --fit-minutes M`: whole epochs fitted to a time budget by a timed trial."""

import json
import re

import pytest

from dinofuse.engine.cli import main
from dinofuse.engine.config import load_config
from dinofuse.engine.time_budget import fitted_epochs, knn_evaluations, shrink_schedule
from test_cli import folder  # noqa: F401  (the image-folder fixture)
from test_train import TINY


def test_fitted_epochs_count_each_epochs_steps_and_its_save():
    # 10 steps of 0.5 s and a 5 s save: 10 s an epoch
    assert fitted_epochs(1.0, 100, 10, 0.5, 5.0) == 6
    assert fitted_epochs(1.0, 100, 10, 0.5, 0.0) == 12
    assert fitted_epochs(59.9 / 60, 100, 10, 0.5, 5.0) == 5  # whole epochs only
    assert fitted_epochs(1.0, 4, 10, 0.5, 5.0) == 4  # never more than planned
    assert fitted_epochs(0.01, 4, 10, 0.5, 5.0) == 1  # at least one


def test_fitted_epochs_count_the_between_epoch_knn():
    """run.knn_every_epochs: each evaluation's time counts, but not after the last epoch
    when the report after training follows (the trainer skips that one)."""
    assert [knn_evaluations(e, 2, True) for e in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]
    assert [knn_evaluations(e, 2, False) for e in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    assert knn_evaluations(7, 0, False) == 0
    # 10 steps of 0.5 s and no save: 5 s an epoch; an 8 s k-NN after each
    assert fitted_epochs(1.0, 100, 10, 0.5, 0.0, 8.0, 1, report_after=True) == 5  # 65 - 8 s
    assert fitted_epochs(1.0, 100, 10, 0.5, 0.0, 8.0, 1, report_after=False) == 4  # 52 s
    assert fitted_epochs(1.0, 100, 10, 0.5, 0.0, 8.0, 0) == 12  # none asked for
    assert fitted_epochs(0.01, 100, 10, 0.5, 0.0, 8.0, 1) == 1  # at least one


def test_the_fit_takes_the_knn_estimate_and_says_it(monkeypatch):
    from dinofuse.engine import time_budget

    monkeypatch.setattr(time_budget, "measure", lambda cfg: (0.5, 0.0, 10, 8.0))
    for every, after, epochs in ((1, "true", 5), (1, "false", 4), (0, "true", 12)):
        cfg = load_config("default", ["optim.epochs=100", f"run.knn_every_epochs={every}",
                                      f"run.knn_after_training={after}"])
        fitted, fit = time_budget.fit_to_minutes(cfg, 1.0)
        assert fitted.optim.epochs == fit.epochs == epochs
    assert fit.describe(1.0).endswith("5.0 s per epoch, measured)")
    fit.knn_every = 2
    assert fit.describe(1.0).endswith("5.0 s per epoch, measured; a 8.0 s k-NN every 2 epoch(s), "
                                      "estimated)")


def test_the_knn_estimate_scales_its_timed_images_to_memory_and_queries(folder, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """A clock that moves 10 ms per image extracted: the estimate is 10 ms per image of the
    memory and the queries, whatever share of them was timed."""
    from dinofuse.engine import time_budget
    from dinofuse.engine.eval import knn
    from dinofuse.engine.train import Trainer

    trial = Trainer(load_config("default", TINY + [f'data.path="{folder}"', "run.knn_every_epochs=1",
                                                   f'run.knn_val="{folder}"',
                                                   f'run.output_dir="{tmp_path}"']))
    clock, timed = [0.0], []

    def extract(backbone, images, *args, **kwargs):
        timed.append(len(images))
        clock[0] += 0.01 * len(images)

    monkeypatch.setattr(knn, "extract_features", extract)
    monkeypatch.setattr(time_budget.time, "perf_counter", lambda: clock[0])
    memory, queries = trial.knn_sets
    monkeypatch.setattr(time_budget, "KNN_TIMED_IMAGES", len(memory) // 2)
    assert time_budget._knn_seconds(trial) == pytest.approx(0.01 * (len(memory) + len(queries)))
    assert timed == [len(memory) // 2]


def test_the_trial_times_the_knn_only_when_asked(folder, tmp_path, reference_path):  # noqa: F811
    from dinofuse.engine.time_budget import measure

    cfg = load_config("default", TINY + [f'data.path="{folder}"', "run.knn_every_epochs=1",
                                         f'run.knn_val="{folder}"', f'run.output_dir="{tmp_path}"'])
    step_s, save_s, iters, knn_s = measure(cfg)
    assert step_s > 0 and save_s > 0 and iters == 4 and knn_s > 0
    cfg.run.knn_every_epochs = 0
    assert measure(cfg)[3] == 0.0


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

