"""A short table of everything a GPU check measured, read from its output folder.

    python -m dinofuse.bench.summary DIR
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path


def summarize(folder: Path) -> str:
    lines = []
    stages = folder / "stages.txt"
    if stages.is_file():
        lines += ["stages:", *("  " + s for s in stages.read_text().splitlines()), ""]
    kernels = folder / "kernels.json"
    if kernels.is_file():
        k = json.loads(kernels.read_text())
        lines.append(f"kernels ({k['device']}, copy {k['copy_bandwidth_gbs']} GB/s):")
        for r in k["rows"]:
            if r["variant"] in ("fused", "torch.compile(official)", "torch.compile(torch)"):
                ms = r.get("kernel_ms") or r["ms"]
                floor = r.get("floor_ms")
                over = f", {ms / floor:.2f}x floor" if floor else ""
                lines.append(f"  {r['case']} | {r['variant']}: {ms:.3f} ms{over}")
        swept: dict[str, dict] = {}  # the fastest launch shape per case, when swept
        for r in k["rows"]:
            if r["variant"].startswith("fused ") and r["case"].startswith(("loss", "layer_norm")):
                ms = r.get("kernel_ms") or r["ms"]
                if r["case"] not in swept or ms < swept[r["case"]]["ms"]:
                    swept[r["case"]] = dict(ms=ms, variant=r["variant"])
        for case, best in swept.items():
            lines.append(f"  {case} | fastest swept: {best['ms']:.3f} ms ({best['variant']})")
        lines.append("")
    for path in sorted(folder.glob("train-*.json")):
        t = json.loads(path.read_text())
        w = t["workload"]
        lines.append(f"{path.stem} ({t['device']}, peak {t['matmul_peak']['tflops']:.0f} TFLOP/s):")
        for r in t["rows"]:
            if r["status"] != "ok":
                lines.append(f"  {r['name']}: {r['status']}")
                continue
            speed = f" {r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else ""
            mem = f" {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
            lines.append(f"  {r['name']}: {r['images_per_s']:.0f} img/s{speed} MFU "
                         f"{r['mfu_pct']:.1f}%{mem}")
        for tgt in t["targets"]:
            lines.append(f"  target {tgt['target']}: {tgt['measured']} "
                         f"({'met' if tgt['met'] else 'MISSED'})")
        if w["data"] != "synthetic":
            lines.append(f"  data: {w['data']} via {w['data_backend']}")
        lines.append("")
    data = folder / "data.json"
    if data.is_file():
        d = json.loads(data.read_text())
        lines.append(f"data pipeline ({d['device']}, {d['crops']}): DALI {d['dali_images_per_s']} "
                     f"img/s, torchvision {d['torchvision_images_per_s']} img/s "
                     f"({d['dali_over_torchvision']}x)")
        for name, rate in d.get("dali_breakdown_images_per_s", {}).items():
            lines.append(f"  DALI {name}: {rate} img/s")
        loads = d.get("dali_hw_decoder_load_images_per_s", {})
        for load, rate in (loads.items() if isinstance(loads, dict) else ()):
            lines.append(f"  DALI with hw_decoder_load={load}: {rate} img/s")
    preset = folder / "default_gpu"
    if (preset / "knn.json").is_file():
        knn = json.loads((preset / "knn.json").read_text())
        logs = [json.loads(line) for line in (preset / "log.jsonl").read_text().splitlines()] \
            if (preset / "log.jsonl").is_file() else []
        trained = ""
        if logs:
            epochs = tomllib.loads((preset / "config.toml").read_text())["optim"]["epochs"] \
                if (preset / "config.toml").is_file() else "?"
            rates = sorted(log["images_per_s"] for log in logs if "images_per_s" in log)
            rate = f", {rates[len(rates) // 2]:.0f} img/s" if rates else ""
            # the epoch reached against the schedule's: tells whether the time limit cut it
            trained = f", {logs[-1]['step'] + 1} steps (epoch {logs[-1]['epoch']} of {epochs}){rate}"
        lines.append(f"default run's GPU preset (Fashion-MNIST{trained}), k-NN top-1: " +
                     ", ".join(f"{name} {acc['top1']:.2f}%" for name, acc in knn.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out")), end="")
