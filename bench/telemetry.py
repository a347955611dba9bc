"""GPU telemetry sampled by NVML (nvidia-ml-py's `pynvml`) while a block of code runs.

    with GPUTelemetry(device_index=0) as tel:
        ...timed steps...
    tel.summary()  # {"sm_util_pct": {...}, "power_w": {...}, ...} or {"status": "no GPU ..."}

A background thread reads SM utilization, power, SM clock and memory used every `period_s`.
Without a GPU or NVML the summary says so instead of failing.
"""

from __future__ import annotations

import statistics
import threading
import time


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": round(statistics.fmean(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1)}


class GPUTelemetry:
    FIELDS = ("sm_util_pct", "mem_util_pct", "power_w", "sm_clock_mhz", "mem_used_mib")

    def __init__(self, device_index: int | None = 0, period_s: float = 0.05):
        self.device_index, self.period_s = device_index, period_s
        self.samples: dict[str, list[float]] = {f: [] for f in self.FIELDS}
        self.status = "ok"
        self._nvml = self._handle = self._thread = None
        self._stop = threading.Event()

    def __enter__(self) -> GPUTelemetry:
        import torch

        if self.device_index is None or not torch.cuda.is_available():
            self.status = "no GPU"
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as e:  # NVML missing or refused: report, never fail the benchmark
            self.status = f"no GPU telemetry ({type(e).__name__}: {e})"
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        nv, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h)
                self.samples["sm_util_pct"].append(util.gpu)
                self.samples["mem_util_pct"].append(util.memory)
                self.samples["power_w"].append(nv.nvmlDeviceGetPowerUsage(h) / 1000)
                self.samples["sm_clock_mhz"].append(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
                self.samples["mem_used_mib"].append(nv.nvmlDeviceGetMemoryInfo(h).used / 2 ** 20)
            except Exception as e:
                self.status = f"sampling stopped ({type(e).__name__}: {e})"
                return
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def summary(self) -> dict:
        out: dict = {"status": self.status, "samples": len(self.samples["sm_util_pct"])}
        if out["samples"]:
            out.update({f: _stats(v) for f, v in self.samples.items()})
        return out
