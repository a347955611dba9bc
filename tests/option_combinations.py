"""Train with random combinations of the config's choices, then resume: what each choice's
own tests miss is where two of them meet (BatchNorm in the head under FSDP2 with bf16 was
found this way). Not part of the suite; run it by hand after changing the trainer:

    .venv/bin/python tests/option_combinations.py SEED RUNS [--torchrun] [--data PATH ...]

Each run trains a tiny ViT for 3 steps, then `--resume`s for 3 more (under --torchrun: 2
gloo ranks, resumed by one process). A run that fails is printed with its choices and the
end of its output: a clear one-line user error is fine, anything else is a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ['model.arch="vit_tiny"', "model.embed_dim=32", "model.depth=3", "model.num_heads=2",
        "model.patch_size=4", "model.img_size=16", "model.out_dim=67", "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16", "data.global_crop_size=16", "data.local_crop_size=8",
        "optim.batch_size_per_device=4", "optim.epochs=2", "optim.warmup_epochs=0.5",
        "run.knn_after_training=false", "run.log_every_steps=1"]

CHOICES = {
    "model.attention": ['"auto"', '"sdpa"', '"naive"'],
    "model.packed": ["true", "false"],
    "model.use_bn_in_head": ["true", "false"],
    "model.norm_last_layer": ["true", "false"],
    "model.head_nlayers": ["1", "2", "3"],
    "model.drop_path_rate": ["0.0", "0.2"],
    "data.local_crops_number": ["0", "1", "3"],
    "data.backend": ['"auto"', '"torchvision"', '"dali"', '"tensor"'],
    "data.num_workers": ["0", "1"],
    "optim.clip_grad": ["0", "3.0", "0.01"],
    "optim.clip_mode": ['"per_param"', '"global"'],
    "optim.freeze_last_layer": ["0", "1"],
    "optim.precision": ['"fp32"', '"bf16"', '"auto"'],
    "optim.warmup_teacher_temp_epochs": ["0", "1"],
    "impl.loss": ['"fused"', '"official"'],
    "impl.ema": ['"fused"', '"official"'],
    "impl.clip": ['"fused"', '"official"'],
    "impl.optimizer": ['"auto"', '"fused"', '"foreach"', '"official"'],
    "impl.checkpoint_blocks": ["0", "-1", "2"],
    "impl.patch_embedding": ['"matmul"', '"conv"'],
    "impl.residual_dtype": ['"fp32"', '"autocast"'],
    "impl.layer_norm": ['"auto"', '"fused"', '"torch"'],  # fused: the Triton kernel (interpreted)
    "impl.bias_gelu": ['"auto"', '"fused"', '"torch"'],
    "impl.loss_check": ['"deferred"', '"official"'],
    "impl.cuda_graph": ['"auto"', '"on"', '"off"'],  # on: the graph's step, eagerly on a CPU
    "run.save_every_steps": ["0", "2"],
    "run.checkpoint_format": ['"auto"', '"file"', '"sharded"'],
}
ONE_PROCESS = {"impl.fsdp": ['"auto"', '"always"'], "impl.fsdp_unit_blocks": ["1", "0", "2"]}
SEVERAL = {"impl.reshard_after_forward": ["true", "false"], "impl.fsdp_unit_blocks": ["1", "0", "2"],
           "impl.reshard_root_after_forward": ["true", "false"],
           "impl.reduce_dtype": ['"fp32"', '"bf16"'], "run.async_checkpoint": ["true", "false"]}


def what_went_wrong(output: str) -> str:
    """The lines that say it (an error line, an abort, a rank's exit code; torchrun's own
    summary is long), then the last few."""
    lines = output.splitlines()
    said = [line for line in lines
            if re.search(r"error|terminate called|Traceback|exitcode|Signal \d+", line, re.I)]
    return "\n".join(said[:20] + ["..."] + lines[-8:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed", type=int)
    ap.add_argument("runs", type=int)
    ap.add_argument("--torchrun", action="store_true", help="2 gloo ranks, resumed by one")
    ap.add_argument("--data", nargs="+", default=["synthetic", "fashion-mnist"],
                    help="data.path choices (folders and shards of your own add to these)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    bin_dir = Path(sys.executable).parent
    one = [str(bin_dir / "dinofuse"), "train"]
    launch = ([str(bin_dir / "torchrun"), "--nproc_per_node=2", f"--master-port={29500 + args.seed % 400}",
               "-m", "dinofuse.engine.train"] if args.torchrun else one)
    choices = {**CHOICES, **(SEVERAL if args.torchrun else ONE_PROCESS),
               "data.path": [json.dumps(p) for p in args.data]}
    env = dict(os.environ, TRITON_INTERPRET="1")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="dinofuse-combinations-") as scratch:
        for run in range(args.runs):
            picked = [f"{name}={rng.choice(values)}" for name, values in choices.items()]
            common = ["--output-dir", str(Path(scratch) / f"run{run}"), "--quiet", *TINY, *picked]
            done = subprocess.run(launch + common + ["--max-steps", "3"], capture_output=True,
                                  text=True, env=env)
            if done.returncode == 0:
                done = subprocess.run(one + common + ["--resume", "--max-steps", "3"],
                                      capture_output=True, text=True, env=env)
            print(json.dumps({"run": run, "ok": done.returncode == 0, "choices": picked}), flush=True)
            if done.returncode:
                failed += 1
                print(what_went_wrong(done.stderr + done.stdout), flush=True)
    print(f"{failed} of {args.runs} runs failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
