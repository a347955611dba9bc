"""Data-pipeline benchmark: images/s of the DALI multi-crop graph and the torchvision
reference, on the same JPEGs and the same cores, in one run.

    python -m dinofuse.bench.data [--out DIR] [--images 256] [--local-crops 10] [--threads 2]

An image is 2 global (224 px) + N local (96 px) crops. The JPEGs are generated: about
500x375, smooth content with texture (sizes are reported). On a machine with CUDA the DALI
row decodes with nvJPEG (device="mixed") and crops on the GPU; without one it is the CPU twin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinofuse.bench.meta import run_metadata, write_results
from dinofuse.dataloading.spec import MultiCropSpec
from dinofuse.dataloading.torchvision_multicrop import MultiCropAugmentation, SeededMultiCrop
from dinofuse.dataloading.readers import ImageFiles


def make_jpegs(root: Path, n: int, seed: int = 0) -> list[str]:
    """ImageNet-like JPEGs: 500x375, smooth shapes plus fine texture, quality 95."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    files = []
    for i in range(n):
        channels = []
        for _ in range(3):
            f = rng.uniform(0.005, 0.05, 4)
            base = (np.sin(xx * f[0] + yy * f[1]) + np.cos(xx * f[2] - yy * f[3])) * 60 + 128
            texture = np.sin(xx * rng.uniform(0.3, 0.9)) * np.cos(yy * rng.uniform(0.3, 0.9)) * 25
            channels.append(base + texture + rng.normal(0, 6, xx.shape))
        path = root / f"{i:05d}.jpg"
        Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)).save(path, quality=95)
        files.append(str(path))
    return files


def time_torchvision(root: Path, spec: MultiCropSpec, batch: int, workers: int,
                     repeat: int = 1) -> float:
    dataset = SeededMultiCrop(ImageFiles(root), MultiCropAugmentation(spec))
    dataset = torch.utils.data.ConcatDataset([dataset] * repeat)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                         drop_last=True)
    return _images_per_s(loader)


def _images_per_s(loader) -> float:
    """Images per second after the first batch (start-up: workers, first decode)."""
    it = iter(loader)
    next(it)
    t0, seen = time.perf_counter(), 0
    for crops, _ in it:
        seen += crops[0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if seen == 0:
        raise ValueError("one batch only: give more --images (or --repeat) than --batch")
    return seen / (time.perf_counter() - t0)


def time_dali(files: list[str], spec: MultiCropSpec, batch: int, threads: int,
              repeat: int = 1, hw_decoder_load: float | None = None,
              fancy_upsampling: bool = True) -> float:
    from dinofuse.dataloading.dali_multicrop import DALIMultiCropLoader, build_pipeline

    files = files * repeat  # each listed file is read and decoded again: a longer epoch
    device_id = 0 if torch.cuda.is_available() else None
    loader = DALIMultiCropLoader(build_pipeline(files, [0] * len(files), spec, batch_size=batch,
                                                device_id=device_id, num_threads=threads,
                                                hw_decoder_load=hw_decoder_load,
                                                fancy_upsampling=fancy_upsampling),
                                 2 + spec.local_crops_number)
    return _images_per_s(loader)


# a breakdown row on a GPU: the full graph with nvJPEG's own chroma upsampling
NVJPEG_CHROMA = "all crops, nvJPEG's own chroma upsampling (data.jpeg_fancy_upsampling=false)"


def breakdown_specs(spec: MultiCropSpec) -> dict[str, MultiCropSpec]:
    """Lighter graphs than `spec`, each adding one part: read, decode and cut 2 crops with no
    augmentation (every coin off); then DINO's augmentations on the 2 global crops; then
    the local crops (the full graph, timed as the main row). Last, the full graph with
    DALI's own contrast and hue (`data.dali_color="dali"`): what the official formulas cost."""
    plain = dataclasses.replace(spec, local_crops_number=0, flip_p=0.0, color_jitter_p=0.0,
                                grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    return {"decode + 2 crops, no augmentation": plain,
            "2 global crops, augmented": dataclasses.replace(spec, local_crops_number=0),
            "all crops, DALI's own contrast and hue": dataclasses.replace(spec, dali_color="dali")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--local-crops", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1,
                    help="read the files this many times per run (a longer timed epoch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="DALI threads and torchvision workers (the same cores for both)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time DALI on lighter graphs: where its time goes")
    ap.add_argument("--hw-decoder-load", type=float, nargs="*", default=[],
                    help="also time the full DALI graph with these shares of JPEGs on the "
                         "GPU's hardware decoder (DALI's default 0.65; GPU only)")
    args = ap.parse_args(argv)
    spec = MultiCropSpec(local_crops_number=args.local_crops)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), args.images)
        kb = np.mean([os.path.getsize(f) for f in files]) / 1024
        results = {
            **run_metadata(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "cpu_cores": os.cpu_count(), "images": args.images, "mean_jpeg_kb": round(float(kb), 1),
            "crops": f"2x224 + {args.local_crops}x96", "batch": args.batch, "threads": args.threads,
            "torchvision_images_per_s": round(time_torchvision(Path(tmp), spec, args.batch,
                                                               args.threads, args.repeat), 1),
            "dali_images_per_s": round(time_dali(files, spec, args.batch, args.threads,
                                                 args.repeat), 1),
            "images_read": args.images * args.repeat,
        }
        if args.breakdown:
            results["dali_breakdown_images_per_s"] = {
                name: round(time_dali(files, lighter, args.batch, args.threads, args.repeat), 1)
                for name, lighter in breakdown_specs(spec).items()}
            if torch.cuda.is_available():  # the default interpolates chroma as PIL does
                results["dali_breakdown_images_per_s"][NVJPEG_CHROMA] = round(time_dali(
                    files, spec, args.batch, args.threads, args.repeat, fancy_upsampling=False), 1)
        if args.hw_decoder_load and not torch.cuda.is_available():
            results["dali_hw_decoder_load_images_per_s"] = "skipped: no GPU (mixed decoding only)"
        elif args.hw_decoder_load:
            results["dali_hw_decoder_load_images_per_s"] = {
                str(load): round(time_dali(files, spec, args.batch, args.threads, args.repeat,
                                           hw_decoder_load=load), 1)
                for load in args.hw_decoder_load}
    results["dali_over_torchvision"] = round(results["dali_images_per_s"] /
                                             results["torchvision_images_per_s"], 2)
    write_results(args.out, "data", results)
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
