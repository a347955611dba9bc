"""The compiled Triton kernels on a GPU, at full size. Skipped where there is no CUDA device.

Run with TRITON_INTERPRET=0 (bench/gpu_check.sh does): under the interpreter CUDA tensors
would be copied through the host instead of running the compiled kernels.
"""

import importlib

import pytest
import torch

from dinofuse.bench.kernels import LAYER_NORM_SWEEP, STUDENT_SWEEP, TEACHER_SWEEP
from dinofuse.kernels import DINOLoss, dino_loss, ema_update_
from official_dino import OfficialDINOLoss
from test_dino_loss import assert_matches_reference, make_inputs
from test_ema import assert_ema_exact
from test_bias_gelu import check as check_bias_gelu
from test_layer_norm import check as check_layer_norm
from test_layer_norm import check_add as check_add_layer_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_kernels_are_compiled_not_interpreted():
    from dinofuse.kernels import _runtime

    assert not _runtime.INTERPRET, "set TRITON_INTERPRET=0 for the CUDA tests"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,G,ncrops", [
    (65536, 64, 2, 10),   # the official size
    (262144, 2, 2, 4),    # the largest K the issue names
    (65537, 1, 1, 10),    # K not a power of two, batch 1, one global crop
    (1000, 3, 2, 2),
    (7, 5, 2, 12),
])
def test_loss_matches_float64_reference(K, B, G, ncrops, dtype, poisoned_outputs):
    student, teacher, center = make_inputs(K, B, G, ncrops, dtype, device="cuda")
    assert_matches_reference(student, teacher, center, G)


@pytest.mark.parametrize("launch", STUDENT_SWEEP)
def test_every_benchmarked_launch_shape(launch, monkeypatch, poisoned_outputs):
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.dino_loss"),
                        "STUDENT_LAUNCH_OVERRIDE", launch)
    student, teacher, center = make_inputs(65536, 4, 2, 10, torch.bfloat16, device="cuda")
    assert_matches_reference(student, teacher, center, 2)


@pytest.mark.parametrize("launch", TEACHER_SWEEP)
def test_every_benchmarked_teacher_launch_shape(launch, monkeypatch, poisoned_outputs):
    module = importlib.import_module("dinofuse.kernels.dino_loss")
    monkeypatch.setattr(module, "TEACHER_LAUNCH", {**module.TEACHER_LAUNCH, **launch})
    student, teacher, center = make_inputs(65536, 72, 2, 4, torch.bfloat16, device="cuda")
    assert_matches_reference(student, teacher, center, 2)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates(where):
    student, teacher, center = make_inputs(65536, 2, 2, 4, torch.bfloat16, device="cuda")
    (student if where == "student" else teacher)[1, 12345] = float("nan")
    assert torch.isnan(dino_loss(student, teacher, center)[0])


def test_upstream_gradient_scales_in_place():
    student, teacher, center = make_inputs(4096, 8, 2, 10, torch.bfloat16, device="cuda")
    grads = []
    for factor in (1.0, 3.0):
        s = student.clone().requires_grad_()
        (dino_loss(s, teacher, center)[0] * factor).backward()
        grads.append(s.grad.float())
    torch.testing.assert_close(grads[1], grads[0] * 3.0, rtol=8e-3, atol=1e-6)


def test_inductor_compiles_a_model_calling_the_loss():
    K, B, ncrops = 65536, 4, 10
    head = torch.nn.Linear(64, K, device="cuda")
    x = torch.randn(ncrops * B, 64, device="cuda")
    teacher = torch.randn(2 * B, K, device="cuda")
    center = torch.randn(K, device="cuda") * 0.1

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return dino_loss(head(x), teacher, center)[0]

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    grad_c = head.weight.grad.clone()
    head.weight.grad = None
    loss_e = step(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_c, head.weight.grad, rtol=2e-2, atol=1e-4)


def test_dino_loss_module_matches_official():
    args = dict(out_dim=65536, ncrops=10, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=2, nepochs=4)
    ours, official = DINOLoss(**args).cuda(), OfficialDINOLoss(**args).cuda()
    for epoch in range(4):
        student = torch.randn(10 * 8, 65536, device="cuda") * 3
        teacher = torch.randn(2 * 8, 65536, device="cuda") * 0.3 + 0.05 * epoch
        s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
        loss, loss_off = ours(s1, teacher, epoch), official(s2, teacher, epoch)
        loss.backward()
        loss_off.backward()
        torch.testing.assert_close(loss, loss_off, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(ours.center, official.center, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_ema_vit_base_with_head(student_dtype, momentum_kind):
    from dinofuse.bench.cases import EmaCase

    teacher, student = EmaCase("vit_base16+head", student_dtype).inputs("cuda")
    before = [t.clone() for t in teacher]
    m = 0.9961
    ema_update_(teacher, student, m if momentum_kind == "float" else torch.tensor(m, device="cuda"))
    assert_ema_exact(before, student, teacher, float(torch.tensor(m, dtype=torch.float32)))


def test_ema_replays_in_a_cuda_graph_with_a_new_momentum():
    teacher = [torch.randn(n, device="cuda") for n in (1, 1000, 70001)]
    student = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (1, 1000, 70001)]
    momentum = torch.tensor(0.5, device="cuda")
    ema_update_(teacher, student, momentum)  # warm up: compile and cache the table
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(teacher, student, momentum)
    for m in (0.9, 0.999):
        momentum.fill_(m)
        before = [t.clone() for t in teacher]
        graph.replay()
        torch.cuda.synchronize()
        assert_ema_exact(before, student, teacher, float(torch.tensor(m, dtype=torch.float32)))


@pytest.mark.parametrize("rows,D,dtype,out_dtype", [
    (64 * 764, 384, torch.float32, torch.bfloat16),  # a ViT-S/16 step's tokens, autocast
    (64 * 764, 768, torch.float32, torch.bfloat16),
    (64 * 764, 384, torch.bfloat16, torch.bfloat16),  # the bf16 residual stream
    (4097, 1024, torch.float16, torch.float16),
    (1, 37, torch.float32, torch.float32),
    (3, 100, torch.bfloat16, torch.float32),
])
def test_layer_norm_matches_float64_reference(rows, D, dtype, out_dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.layer_norm"), "POISON_OUTPUTS", True)
    x = (torch.randn(rows, D, device="cuda") * 2 + 0.5).to(dtype)
    w, b = torch.randn(D, device="cuda") + 1, torch.randn(D, device="cuda")
    check_layer_norm(x, w, b, 1e-6, out_dtype)


@pytest.mark.parametrize("launch", LAYER_NORM_SWEEP, ids=str)
def test_every_benchmarked_layer_norm_launch_shape(launch, monkeypatch):
    module = importlib.import_module("dinofuse.kernels.layer_norm")
    monkeypatch.setattr(module, "POISON_OUTPUTS", True)
    for name, value in launch.items():
        monkeypatch.setattr(module, name, value)
    x = torch.randn(64 * 764 + 3, 384, device="cuda")
    check_layer_norm(x, torch.randn(384, device="cuda") + 1, torch.randn(384, device="cuda"), 1e-6,
                     torch.bfloat16)


@pytest.mark.parametrize("rows,D,dtype,branch_dtype", [
    (64 * 764, 384, torch.float32, torch.bfloat16),  # a ViT-S/16 block's residual add, autocast
    (64 * 764, 768, torch.bfloat16, torch.bfloat16),  # the bf16 stream, ViT-B
    (5, 100, torch.float32, torch.float32),
])
def test_add_layer_norm_matches_float64_reference(rows, D, dtype, branch_dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.layer_norm"), "POISON_OUTPUTS", True)
    x = (torch.randn(rows, D, device="cuda") * 2 + 0.5).to(dtype)
    branch = torch.randn(rows, D, device="cuda").to(branch_dtype)
    scale = (torch.rand(rows, device="cuda") < 0.9).float() / 0.9
    check_add_layer_norm(x, branch, scale, torch.randn(D, device="cuda") + 1,
                         torch.randn(D, device="cuda"), 1e-6, dtype if dtype != torch.float32 else torch.bfloat16)


@pytest.mark.parametrize("rows,N,dtype,bias_dtype", [
    (64 * 764, 1536, torch.bfloat16, torch.float32),  # ViT-S/16's fc1 under autocast
    (64 * 764, 3072, torch.bfloat16, torch.float32),  # ViT-B
    (3, 300, torch.float32, torch.float32),
])
def test_bias_gelu_matches_float64_reference(rows, N, dtype, bias_dtype, monkeypatch):
    monkeypatch.setattr(importlib.import_module("dinofuse.kernels.bias_gelu"), "POISON_OUTPUTS", True)
    check_bias_gelu((torch.randn(rows, N, device="cuda") * 2).to(dtype),
                    torch.randn(N, device="cuda").to(bias_dtype))


def test_fused_layer_norm_in_a_vit_under_autocast_matches_torchs():
    """ViT-S/16 under bf16 autocast with our LayerNorm (the default on CUDA) against torch's:
    the same outputs and gradients to bf16's precision."""
    from dinofuse.engine.models import vit_small

    x = torch.randn(8, 3, 224, 224, device="cuda")
    outs, grads = {}, {}
    for kernel in ("fused", "torch"):
        torch.manual_seed(1)
        model = vit_small(attention="sdpa", layer_norm=kernel).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs[kernel] = out.float()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(outs["fused"], outs["torch"], rtol=0.02, atol=0.02)
    assert torch.nn.functional.cosine_similarity(grads["fused"], grads["torch"], dim=0) > 0.999


def test_xformers_attention_and_packed_multicrop_match_sdpa():
    from dinofuse.engine.models import DINOHead, MultiCropWrapper, resolve_attention, vit_small

    if resolve_attention("auto", torch.device("cuda")) != "xformers":
        from dinofuse.engine.models.vit import xformers_problem

        pytest.skip(f"{xformers_problem()} (bench/gpu_check.sh installs it from .whl/)")
    backbone = vit_small(attention="xformers").cuda().eval()
    wrapper = MultiCropWrapper(backbone, DINOHead(384, 4096)).cuda().eval()
    crops = [torch.randn(4, 3, 224, 224, device="cuda") for _ in range(2)] + \
        [torch.randn(4, 3, 96, 96, device="cuda") for _ in range(6)]
    with torch.no_grad():
        xformers_per_res = wrapper(crops)
        wrapper.packed = True
        xformers_packed = wrapper(crops)
        for block in backbone.blocks:
            block.attn.backend = "sdpa"
        sdpa_packed = wrapper(crops)
    torch.testing.assert_close(xformers_packed, xformers_per_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xformers_packed, sdpa_packed, rtol=1e-4, atol=1e-4)


def test_xformers_packed_under_bf16_autocast_trains_like_sdpa():
    """The training path: bf16 autocast, all crops packed in one sequence with xformers'
    block-diagonal mask (FlashAttention-2 through xformers, torch's kernel when xformers'
    extension does not match torch), forward and backward against SDPA per size group."""
    from dinofuse.engine.models import DINOHead, MultiCropWrapper, resolve_attention, vit_small

    if resolve_attention("auto", torch.device("cuda")) != "xformers":
        from dinofuse.engine.models.vit import xformers_problem

        pytest.skip(f"{xformers_problem()} (bench/gpu_check.sh installs it from .whl/)")
    crops = [torch.randn(4, 3, 224, 224, device="cuda") for _ in range(2)] + \
        [torch.randn(4, 3, 96, 96, device="cuda") for _ in range(6)]
    outs, grads = {}, {}
    for backend in ("xformers", "sdpa"):
        torch.manual_seed(1)
        wrapper = MultiCropWrapper(vit_small(attention=backend), DINOHead(384, 4096)).cuda()
        wrapper.packed = backend == "xformers"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = wrapper(crops)
        out.float().square().mean().backward()
        outs[backend] = out.float()
        grads[backend] = torch.cat([p.grad.flatten() for p in wrapper.parameters() if p.grad is not None])
    torch.testing.assert_close(outs["xformers"], outs["sdpa"], rtol=0.05, atol=0.05)
    assert torch.isfinite(grads["xformers"]).all()
    assert torch.nn.functional.cosine_similarity(grads["xformers"], grads["sdpa"], dim=0) > 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_on_the_gpu(precision, tmp_path):
    """A few real steps in bf16 autocast, and fp16 with a GradScaler: finite losses, the
    teacher following the student, the same losses from the official-style loss and EMA.
    fp16: the scaler starts at 2**16 and skips (halving it) until the tiny model's gradients
    fit in fp16, nine steps on the CPU (test_train's fp16 test), so fp16 runs 14 steps."""
    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    steps = 3 if precision == "bf16" else 14

    def run(*extra):
        torch.manual_seed(0)
        cfg = load_config("default", TINY + ['data.path="synthetic"', f'run.output_dir="{tmp_path}"',
                                             f'optim.precision="{precision}"',
                                             "model.drop_path_rate=0.0", *extra])
        trainer = Trainer(cfg)
        assert trainer.device.type == "cuda"
        teacher0 = [p.detach().clone() for p in trainer.teacher.parameters()]
        losses = [trainer.train_step(crops).loss
                  for crops, _ in zip((b for b, _ in trainer.input.batches(0, 0)), range(steps))]
        assert len(losses) == steps
        moved = any(not torch.equal(a, b) for a, b in zip(teacher0, trainer.teacher.parameters()))
        return losses, moved

    fused, moved = run()
    assert all(torch.isfinite(torch.tensor(fused))), fused
    assert moved, "no step changed the teacher"
    official, _ = run('impl.loss="official"', 'impl.ema="official"', 'impl.clip="official"',
                      'impl.patch_embedding="conv"')
    # half-precision logits, two paths (fp16: the first steps, before the scalers' skips
    # could part ways)
    assert official[:3] == pytest.approx(fused[:3], rel=2e-2)
    low_residual, _ = run('impl.residual_dtype="autocast"')
    assert low_residual[:3] == pytest.approx(fused[:3], rel=2e-2)


def test_patch_embedding_and_half_precision_residual_on_the_gpu():
    """ViT-S/16 under bf16 autocast: the matmul patch embedding against cuDNN's convolution,
    and the bf16 residual stream (LayerNorm on bf16 weights) against the fp32 one."""
    from dinofuse.engine.models import vit_small

    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    outs, grads = {}, {}
    for name, kwargs in {"default": {}, "conv": dict(patch_embedding="conv"),
                         "bf16 stream": dict(residual_dtype="autocast")}.items():
        torch.manual_seed(1)
        model = vit_small(attention="sdpa", **kwargs).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs[name] = out.float()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads["bf16 stream"]).all()
    for name in ("conv", "bf16 stream"):
        torch.testing.assert_close(outs[name], outs["default"], rtol=0.05, atol=0.05)
        assert torch.nn.functional.cosine_similarity(grads[name], grads["default"], dim=0) > 0.99


def test_the_step_is_one_cuda_graph_by_default_where_a_graph_can_replay_it(tmp_path):
    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    def graphed(*extra):
        cfg = load_config("default", TINY + ['data.path="synthetic"',
                                             f'run.output_dir="{tmp_path}"', *extra])
        return Trainer(cfg).graphed is not None

    assert graphed() and not graphed('optim.precision="fp16"')
    assert not graphed('impl.cuda_graph="off"')


def test_a_training_step_never_makes_the_host_wait(tmp_path):
    """With the defaults a step queues its work and returns: torch's sync debug mode turns
    any synchronizing call (.item(), a pageable copy, nonzero...) into an error. The loss is
    read through an event one step later (not a stream sync). The plain step (a graph's
    capture synchronizes once; its replays are checked in the graph test below)."""
    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    cfg = load_config("default", TINY + ['data.path="synthetic"', f'run.output_dir="{tmp_path}"',
                                         'impl.cuda_graph="off"'])
    trainer = Trainer(cfg)
    batches = (b for b, _ in trainer.input.batches(0, 0))
    trainer.train_step(next(batches))  # first step: one-time set-up (EMA tables, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logs = [trainer.train_step(next(batches)) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.tensor([log.loss, log.grad_norm])).all() for log in logs)


def test_dali_mixed_decoding_gives_crops_on_the_gpu(tmp_path):
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from PIL import Image

    from dinofuse.dataloading.dali_multicrop import DALIMultiCropLoader, build_pipeline
    from dinofuse.dataloading.spec import MultiCropSpec

    files = []
    for i in range(8):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray((np.random.default_rng(i).random((120, 160, 3)) * 255)
                        .astype(np.uint8)).save(path)
        files.append(str(path))
    spec = MultiCropSpec(local_crops_number=4)
    loader = DALIMultiCropLoader(build_pipeline(files, list(range(8)), spec, batch_size=4,
                                                device_id=0), 6, dtype=torch.bfloat16)
    batches = list(loader)
    assert len(batches) == 2
    for crops, _ in batches:
        assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 4
        assert all(c.is_cuda and c.dtype == torch.bfloat16 and torch.isfinite(c).all() for c in crops)


def test_dali_mixed_decodes_jpegs_near_pils_pixels():
    """nvJPEG with libjpeg-turbo's chroma upsampling (data.jpeg_fancy_upsampling, default)
    against PIL's decode (the official loader): closer than nvJPEG's own upsampling, within
    IDCT rounding on average; the EXIF orientation left as PIL leaves it. (Calibrated on no
    GPU yet: the figures are in the message either way.)"""
    pytest.importorskip("nvidia.dali")
    import io

    import numpy as np
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    from dinofuse.dataloading.dali_multicrop import decode_images

    blocks = np.random.default_rng(0).random((12, 16, 3)) * 255  # sharp chroma edges
    pixels = np.kron(blocks, np.ones((8, 8, 1))).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif.tobytes())  # 4:2:0
    data = buf.getvalue()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)

    def decoded(fancy: bool) -> np.ndarray:
        @pipeline_def(batch_size=1, num_threads=1, device_id=0)
        def decode():
            encoded = fn.external_source(source=[[np.frombuffer(data, np.uint8)]], cycle=True)
            return decode_images(encoded, gpu=True, fancy_upsampling=fancy)

        (images,) = decode().run()
        return np.asarray(images.as_cpu()[0]).astype(int)

    fancy, plain = decoded(True), decoded(False)
    assert fancy.shape == plain.shape == expected.shape == (96, 128, 3)
    errors = [float(np.abs(d - expected).mean()) for d in (fancy, plain)]
    assert errors[0] <= errors[1] and errors[0] < 1.0, f"mean |DALI - PIL|: fancy, plain = {errors}"


def test_in_memory_data_is_cut_into_crops_on_the_gpu_without_host_waits(tmp_path):
    """Fashion-MNIST-shaped IDX files: `auto` picks the batched tensor crops on a GPU; they
    arrive in bf16 on the device, and neither cutting them nor the step makes the host wait."""
    from dinofuse.engine.config import load_config
    from dinofuse.engine.train import Trainer
    from fashion_mnist_files import write_fashion_mnist
    from test_train import TINY

    write_fashion_mnist(tmp_path / "fmnist", train=64, test=8, size=16)
    auto = [o for o in TINY if not o.startswith("data.backend")]
    trainer = Trainer(load_config("default", auto + [f'data.path="{tmp_path / "fmnist"}"',
                                                     f'run.output_dir="{tmp_path / "run"}"',
                                                     'impl.cuda_graph="off"']))  # see above
    assert trainer.input.backend == "tensor" and trainer.input.pixels.is_cuda
    batches = (b for b, _ in trainer.input.batches(0, 0))
    trainer.train_step(next(batches))  # first step: one-time set-up (EMA tables, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            crops = next(batches)
            assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
            assert all(c.is_cuda and c.dtype == torch.bfloat16 for c in crops)
            log = trainer.train_step(crops)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.tensor(log.loss))


def test_the_gpu_presets_input_feeds_the_captured_step(tmp_path):
    """The GPU preset's way: Fashion-MNIST-shaped data cut into crops on the GPU by the
    tensor input, packed crops, the step captured by default; replays give finite losses."""
    from dinofuse.engine.config import load_config
    from dinofuse.engine.graph_step import WARMUP_STEPS
    from dinofuse.engine.train import Trainer
    from fashion_mnist_files import write_fashion_mnist
    from test_train import TINY

    write_fashion_mnist(tmp_path / "fmnist", train=64, test=8, size=16)
    auto = [o for o in TINY if not o.startswith("data.backend")]
    trainer = Trainer(load_config("default", auto + [f'data.path="{tmp_path / "fmnist"}"',
                                                     f'run.output_dir="{tmp_path / "run"}"',
                                                     "model.packed=true"]))
    assert trainer.input.backend == "tensor" and trainer.graphed is not None
    batches = (b for b, _ in trainer.input.batches(0, 0))
    logs = [trainer.train_step(next(batches)) for _ in range(WARMUP_STEPS + 4)]
    assert trainer.graphed.captures == 1
    assert all(torch.isfinite(torch.tensor([log.loss, log.grad_norm])).all() for log in logs)
    assert len({log.loss for log in logs[WARMUP_STEPS:]}) > 1  # new crops each replay


@pytest.mark.parametrize("precision,packed,compiled", [
    ("fp32", False, False), ("bf16", False, False), ("bf16", True, False), ("bf16", True, True)])
def test_the_captured_training_step_replays_like_the_eager_one(precision, packed, compiled,
                                                               tmp_path, monkeypatch):
    """impl.cuda_graph: over an epoch boundary (the last layer unfreezes: a second capture)
    with new crops every step, the replayed step gives the eager step's losses and weights,
    and a replayed step never makes the host wait. `compiled`: the graphed run's blocks are
    torch.compiled (compiled during the eager warm-up steps, replayed without guards), the
    eager run's are not."""
    from dinofuse.engine import inputs
    from dinofuse.engine.config import load_config
    from dinofuse.engine.graph_step import WARMUP_STEPS
    from dinofuse.engine.train import Trainer
    from test_train import TINY

    epoch_steps = 12
    monkeypatch.setattr(inputs, "SYNTHETIC_STEPS_PER_EPOCH", epoch_steps)
    steps = epoch_steps + 6
    generator = torch.Generator(device="cuda").manual_seed(0)
    crops = [[torch.randn(4, 3, s, s, device="cuda", generator=generator) for s in (16, 16, 8, 8)]
             for _ in range(steps)]

    def run(graph: bool):
        torch.manual_seed(0)
        cfg = load_config("default", TINY + [
            'data.path="synthetic"', f'run.output_dir="{tmp_path / str(graph)}"',
            f'optim.precision="{precision}"', f"model.packed={str(packed).lower()}",
            f"impl.cuda_graph={str(graph).lower()}", "optim.clip_grad=0.05",
            f"impl.compile_blocks={str(compiled and graph).lower()}"])
        trainer = Trainer(cfg)
        logs = []
        for i, batch in enumerate(crops):
            # epoch 0: WARMUP_STEPS eager steps, a capture (which synchronizes), replays
            if graph and WARMUP_STEPS < i < epoch_steps:
                torch.cuda.set_sync_debug_mode("error")
            try:
                logs.append(trainer.train_step(batch))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        weights = torch.cat([p.detach().flatten() for p in trainer.teacher.parameters()])
        return trainer, [log.loss for log in logs], weights

    eager, eager_losses, eager_teacher = run(False)
    graphed, graphed_losses, graphed_teacher = run(True)
    assert eager.iters_per_epoch == epoch_steps
    assert graphed.graphed.captures == 2 and graphed.graphed.eager_steps == WARMUP_STEPS
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert graphed_losses == pytest.approx(eager_losses, rel=tol)
    assert eager_losses[0] != eager_losses[-1]
    moved = (eager_teacher - torch.cat([p.detach().flatten() for p in
                                        Trainer(eager.cfg).teacher.parameters()])).norm()
    assert (graphed_teacher - eager_teacher).norm() < (1e-2 if precision == "fp32" else 0.2) * moved
    if compiled:
        torch._dynamo.reset()
