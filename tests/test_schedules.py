import numpy as np
import pytest

from dinofuse.engine.schedules import cosine_schedule


def official_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                              start_warmup_value=0):
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("args", [
    (0.0005 * 1024 / 256, 1e-6, 100, 1251, 10),   # official LR
    (0.04, 0.4, 100, 1251, 0),                     # weight decay
    (0.996, 1.0, 100, 1251, 0),                    # teacher momentum
    (1e-3, 1e-6, 3, 7, 1),
    (1.0, 0.0, 2, 1, 1),                           # a one-iteration warmup
])
def test_bit_identical_to_official(args):
    assert cosine_schedule(*args) == official_cosine_scheduler(*args).tolist()


def test_a_fractional_warmup_rounds_down():
    """--fit-minutes shrinks epoch-counted lengths in proportion, so warm-ups can be fractions
    of an epoch: 0.7 x 5 = 3.5 iterations warm up for 3 (the official integer product's
    rounding), and the cosine takes the other 7."""
    values = cosine_schedule(1.0, 0.0, 2, 5, warmup_epochs=0.7, start_warmup=0.0)
    assert len(values) == 10 and values[:3] == [0.0, 0.5, 1.0] and values[3] == 1.0
    assert values[4] < 1.0
