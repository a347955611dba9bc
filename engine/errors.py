"""The trainer's error: a run that cannot go on (its message says why and what to do)."""


class TrainingError(RuntimeError):
    pass
