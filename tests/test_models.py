"""The ViT, the head and the multi-crop forward against the official forward and timm."""

import pytest
import timm
import torch
import torch.nn.functional as F

from dinofuse.engine.models import (
    DINOHead,
    MultiCropWrapper,
    build_vit,
    cancel_last_layer_gradients,
    vit_small,
    vit_tiny,
)
from dinofuse.engine.models.vit import PatchEmbed, split_qkv
from official_vit import official_vit_forward


def random_state(model):
    """Non-default values everywhere (LayerNorm and biases included), so no term hides."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 0.3)
    return model


@pytest.mark.parametrize("size", [224, 96, 160])
@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_matches_official_forward(size, attention):
    model = random_state(vit_tiny(patch_size=16, attention=attention)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model(x)
        ref = official_vit_forward(model.state_dict(), x, patch=16, heads=3)
    assert (ours - ref).abs().max() < 1e-5


def test_non_square_crop_and_patch_8():
    model = random_state(build_vit("vit_tiny", patch_size=8, depth=2)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = official_vit_forward(model.state_dict(), x, patch=8, heads=3)
        assert (model(x) - ref).abs().max() < 1e-5


def test_non_square_crop_with_the_stored_patch_count():
    """112x448 px at patch 16 is 7x28 = 196 patches, the count stored for 224x224: the
    position grid must still be resized (the official check wants a square too)."""
    model = random_state(build_vit("vit_tiny", patch_size=16, depth=2)).eval()
    x = torch.randn(1, 3, 112, 448)
    with torch.no_grad():
        ref = official_vit_forward(model.state_dict(), x, patch=16, heads=3)
        assert (model(x) - ref).abs().max() < 1e-5


def test_layer_norm_eps_is_the_official_one():
    """eps (1e-6) only shows where the stream's variance is near it: the embeddings scaled
    down 1000x. Above, eps 1e-5 in the blocks stayed within the tolerance."""
    model = random_state(build_vit("vit_tiny", patch_size=8, depth=2)).eval()
    with torch.no_grad():
        for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"):
            model.get_parameter(name).mul_(1e-3)
        x = torch.randn(1, 3, 32, 32)
        ref = official_vit_forward(model.state_dict(), x, patch=8, heads=3)
        assert (model(x) - ref).abs().max() < 1e-5


def test_attention_backends_agree_and_maps_are_distributions():
    model = random_state(vit_tiny(depth=3)).eval()
    x = torch.randn(2, 3, 96, 96)
    outs = {}
    for backend in ("naive", "sdpa", "auto"):
        for block in model.blocks:
            block.attn.backend = backend
        with torch.no_grad():
            outs[backend] = model(x)
    torch.testing.assert_close(outs["sdpa"], outs["naive"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["auto"], outs["sdpa"])
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 3, 37, 37)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 37))


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_packed_multicrop_equals_per_resolution(attention):
    backbone = random_state(vit_tiny(depth=2, attention=attention))
    wrapper = MultiCropWrapper(backbone, DINOHead(192, 300, hidden_dim=64, bottleneck_dim=32)).eval()
    crops = [torch.randn(3, 3, 64, 64) for _ in range(2)] + [torch.randn(3, 3, 32, 32) for _ in range(4)]
    with torch.no_grad():
        per_resolution = wrapper(crops)
        wrapper.packed = True
        packed = wrapper(crops)
        one_by_one = torch.cat([wrapper.head(backbone(c)) for c in crops])
    assert per_resolution.shape == (18, 300)
    torch.testing.assert_close(packed, per_resolution, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_resolution, one_by_one, rtol=1e-5, atol=1e-5)


def test_state_dict_is_timm_compatible():
    ours = random_state(vit_small()).eval()
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    assert set(ours.state_dict()) == set(reference.state_dict())
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(reference.forward_features(x)[:, 0], ours(x), rtol=1e-5, atol=1e-5)


def test_parameter_count_and_drop_path():
    assert sum(p.numel() for p in vit_small().parameters()) == 21_665_664
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for b in vit_small(drop_path_rate=0.1).blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_head_names_freeze_and_normalization():
    head = DINOHead(384, 1000, hidden_dim=64, bottleneck_dim=32)
    names = set(dict(head.named_parameters()))
    assert names == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                     "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"}
    assert not head.last_layer.weight_g.requires_grad
    assert torch.all(head.last_layer.weight_g == 1)
    out = head(torch.randn(5, 384))
    # unit prototypes times a unit bottleneck vector: cosine similarities
    assert out.shape == (5, 1000) and out.abs().max() <= 1 + 1e-5
    bn_head = DINOHead(384, 100, use_bn=True, nlayers=3, hidden_dim=64, bottleneck_dim=32)
    assert "mlp.1.running_mean" in bn_head.state_dict() and "mlp.6.weight" in bn_head.state_dict()
    assert DINOHead(8, 10, norm_last_layer=False).last_layer.weight_g.requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_batch_norm_is_torchs_on_one_process(dtype):
    """Without a process group the head's BatchNorm is nn.BatchNorm1d: outputs, gradients,
    running statistics, in training and in evaluation."""
    from dinofuse.engine.models.head import BatchNorm1dAcrossRanks

    torch.manual_seed(0)
    ours, torchs = BatchNorm1dAcrossRanks(7).to(dtype), torch.nn.BatchNorm1d(7).to(dtype)
    with torch.no_grad():
        for m in (ours, torchs):
            m.weight.copy_(torch.linspace(0.5, 2, 7)), m.bias.copy_(torch.linspace(-1, 1, 7))
    for step in range(3):
        x = (torch.randn(9, 7, dtype=dtype) * 3 + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        g = torch.randn(9, 7, dtype=dtype)
        (ours(x) * g).sum().backward()
        (torchs(x2) * g).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(torchs, name).grad)
    torch.testing.assert_close(ours.state_dict(), torchs.state_dict())
    ours.eval(), torchs.eval()
    x = torch.randn(4, 7, dtype=dtype)
    torch.testing.assert_close(ours(x), torchs(x))


def test_head_batch_norm_runs_with_bf16_parameters_and_float32_statistics():
    """FSDP2's bf16 parameters leave the buffers in float32: torch's BatchNorm refused the
    mix ("expected scalar type BFloat16 but found Float"); the statistics are float32."""
    from dinofuse.engine.models.head import BatchNorm1dAcrossRanks

    torch.manual_seed(0)
    bn = BatchNorm1dAcrossRanks(6)
    reference = torch.nn.BatchNorm1d(6)
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    x = torch.randn(10, 6) * 4 + 2
    y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_var, reference.running_var, rtol=2e-2, atol=1e-2)


def test_head_init_is_the_official_one():
    """The MLP: trunc_normal(std 0.02), zero biases. The prototypes, made after that init,
    keep torch's Linear init: uniform in +-1/sqrt(256), std 1/sqrt(3 * 256)."""
    torch.manual_seed(0)
    head = DINOHead(384, 4000)
    for i in (0, 2, 4):
        assert head.mlp[i].weight.std().item() == pytest.approx(0.02, rel=0.02)
        assert not head.mlp[i].bias.any()
    v = head.last_layer.weight_v
    assert v.abs().max() <= 1 / 16 and v.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.02)


def test_last_layer_freeze():
    head = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    head(torch.randn(4, 16)).sum().backward()
    cancel_last_layer_gradients(head, epoch=0, freeze_epochs=1)
    assert head.last_layer.weight_v.grad is None and head.mlp[0].weight.grad is not None
    head(torch.randn(4, 16)).sum().backward()
    cancel_last_layer_gradients(head, epoch=1, freeze_epochs=1)
    assert head.last_layer.weight_v.grad is not None


@pytest.mark.parametrize("make,message", [
    (lambda: build_vit("vit_huge"), "unknown architecture 'vit_huge'"),
    (lambda: vit_tiny(attention="flash"), "attention must be one of"),
    (lambda: vit_tiny(patch_size=16)(torch.randn(1, 3, 100, 100)), "crop size 100x100 is not divisible"),
    (lambda: vit_tiny(img_size=100), "img_size 100 is not divisible"),
    (lambda: vit_tiny(patch_embedding="unfold"), "patch_embedding must be one of matmul, conv"),
    (lambda: vit_tiny(residual_dtype="bf16"), "residual_dtype must be one of fp32, autocast"),
    (lambda: vit_tiny(layer_norm="apex"), "layer_norm must be one of auto, fused, torch"),
    (lambda: vit_tiny(bias_gelu="tanh"), "bias_gelu must be one of auto, fused, torch"),
])
def test_bad_input_is_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_xformers_needs_cuda():
    model = vit_tiny(depth=1, attention="xformers")
    with pytest.raises(ValueError, match="xformers.* cannot run: no CUDA device"):
        model(torch.randn(1, 3, 32, 32))


def test_xformers_gate_lifted_for_its_torch_kernel_operators_is_the_one_we_think(monkeypatch):
    """xformers (0.0.35) refuses every CUDA operator when its compiled extension did not load,
    by one flag; the operators we let through then call torch's own kernels. Pinned here so
    that a new xformers that moves either fails this test instead of the GPU run."""
    import inspect

    xops = pytest.importorskip("xformers.ops")
    from xformers import _cpp_lib
    from xformers.ops.fmha import common, cutlass, flash

    from dinofuse.engine.models.vit import enable_xformers_torch_kernels

    assert "_built_with_cuda" in inspect.getsource(common.AttentionOpBase.not_supported_reasons)
    assert cutlass.FwOp.OPERATOR is torch.ops.aten._efficient_attention_forward
    assert cutlass.BwOp.OPERATOR is torch.ops.aten._efficient_attention_backward
    assert "torch.ops.aten._flash_attention_forward" in inspect.getsource(flash)
    assert xops.fmha.BlockDiagonalMask in cutlass.FwOp.SUPPORTED_ATTN_BIAS_TYPES
    if _cpp_lib._build_metadata is not None:
        pytest.skip("xformers' extension loads here: there is no gate to lift")
    monkeypatch.setattr(common, "_built_with_cuda", False)  # restored after the test
    assert enable_xformers_torch_kernels() and common._built_with_cuda
    assert not enable_xformers_torch_kernels()  # once
    assert enable_xformers_torch_kernels(False) and not common._built_with_cuda  # put back


@pytest.mark.parametrize("case", ["lifted", "opt out", "still failing"])
def test_xformers_falls_back_to_its_torch_kernel_operators_when_its_extension_is_missing(
        monkeypatch, case):
    from dinofuse.engine.models import vit

    gate = {"lifted": False}

    def fake_try(ops, device):  # xformers' behaviour: every CUDA operator gated on the extension
        ok = gate["lifted"] and case != "still failing"
        return None if ok else "xformers is installed but cannot run on this GPU (...)"

    def lift(enabled=True):
        changed = gate["lifted"] != enabled
        gate["lifted"] = enabled
        return changed

    monkeypatch.setattr(vit, "_xformers_ops", lambda: object())
    monkeypatch.setattr(vit, "_try_xformers", fake_try)
    monkeypatch.setattr(vit, "enable_xformers_torch_kernels", lift)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if case == "opt out":
        monkeypatch.setenv("DINOFUSE_XFORMERS_TORCH_KERNELS", "0")
    vit.xformers_problem.cache_clear()
    try:
        if case == "lifted":
            with pytest.warns(UserWarning, match="torch's own kernels"):
                assert vit.xformers_problem() is None
            assert gate["lifted"]
        else:  # not tried, or tried in vain and put back
            assert "cannot run on this GPU" in vit.xformers_problem() and not gate["lifted"]
    finally:
        vit.xformers_problem.cache_clear()


def test_the_packed_attention_mask_is_built_once_on_the_tokens_device(monkeypatch):
    """xformers puts a mask on the current CUDA device unless told: on a machine with a GPU,
    tokens elsewhere (another device, or the CPU) would get a mask they cannot use."""
    pytest.importorskip("xformers.ops")
    from dinofuse.engine.models.vit import _block_diagonal_mask

    _block_diagonal_mask.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # xformers' default: cuda
    layout = ((2, 5), (3, 2))  # two images of 5 tokens, three of 2
    mask = _block_diagonal_mask(layout, torch.device("cpu"))
    assert mask.q_seqinfo.seqstart.device == torch.device("cpu")
    assert mask.q_seqinfo.seqstart_py == [0, 5, 10, 12, 14, 16]
    assert _block_diagonal_mask(layout, torch.device("cpu")) is mask
    _block_diagonal_mask.cache_clear()


def test_trying_xformers_where_it_cannot_run_says_why():
    pytest.importorskip("xformers.ops")
    from dinofuse.engine.models.vit import _try_xformers, _xformers_ops

    problem = _try_xformers(_xformers_ops(), torch.device("cpu"))
    assert problem.startswith("xformers is installed but cannot run on this GPU (NotImplementedError")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_xformers_probe_runs_its_backward_under_no_grad_and_inference_mode(context):
    """The first attention call (which probes) may be the teacher's, under no_grad."""
    from dinofuse.engine.models.vit import _try_xformers

    class Ops:  # xformers' API, computed by SDPA (runs on the CPU)
        class fmha:
            class BlockDiagonalMask:
                @staticmethod
                def from_seqlens(lengths, device):
                    return None

        @staticmethod
        def memory_efficient_attention(q, k, v, attn_bias=None):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())

    with context():
        assert _try_xformers(Ops, torch.device("cpu")) is None


def test_fix_attention_backend_decides_auto_once_and_blocks_trace_whole():
    model = vit_tiny(depth=2, attention="auto")
    assert model.fix_attention_backend(torch.device("cpu")) == "sdpa"
    assert {b.attn.backend for b in model.blocks} == {"sdpa"}
    explained = torch._dynamo.explain(model.blocks[0])(torch.randn(2, 5, model.embed_dim))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with pytest.raises(ValueError, match="no CUDA device"):
        vit_tiny(depth=1, attention="xformers").fix_attention_backend(torch.device("cpu"))


def test_a_compiled_block_traces_no_backend_check(monkeypatch):
    """The backend fixed, a compiled block does not trace `resolve_attention` (its cached
    xformers probe broke every compiled block's graph on a GPU)."""
    from dinofuse.engine.models import vit

    model = vit_tiny(depth=1, attention="auto")
    model.fix_attention_backend(torch.device("cpu"))
    x = torch.randn(2, 5, model.embed_dim)
    expected = model.blocks[0](x)[0]

    def checked(*args):
        raise AssertionError("resolve_attention traced")

    monkeypatch.setattr(vit, "resolve_attention", checked)
    torch._dynamo.reset()
    try:
        out = torch.compile(model.blocks[0], backend="eager", fullgraph=True)(x)[0]
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, expected)


def test_blocks_with_their_own_drop_path_rates_share_compiled_graphs():
    """impl.compile_blocks: the blocks (rates rising with depth, 0 at the first) run one
    compiled graph per input shape and grad mode. With each rate a float attribute dynamo
    compiled every block anew, hit its recompile limit (8) and ran the rest eagerly."""
    from torch._dynamo.utils import counters

    from dinofuse.engine.models.vit import VisionTransformer

    torch._dynamo.reset()
    counters.clear()
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2,
                              drop_path_rate=0.1, attention="sdpa")
    for block in model.blocks:
        block.compile(dynamic=False, backend="eager")
    try:
        for size in (32, 16):
            model(torch.randn(4, 3, size, size)).sum().backward()
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32))
        assert counters["stats"]["unique_graphs"] == 3  # two crop sizes, and no_grad
    finally:
        torch._dynamo.reset()


def test_compiled_drop_path_drops_whole_samples_at_its_rate():
    from dinofuse.engine.models.vit import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.25)
    compiled = torch.compile(drop, backend="eager", fullgraph=True)
    x = torch.ones(4000, 3, 2)
    y = compiled(x)
    per_sample = y.reshape(4000, -1)
    assert (per_sample == per_sample[:, :1]).all()  # one draw per sample
    assert per_sample[:, 0].unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (per_sample[:, 0] > 0).float().mean() == pytest.approx(0.75, abs=0.03)
    drop.eval()
    assert torch.equal(compiled(x), x)
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_packed_drop_path_drops_each_image_at_its_rate(compiled):
    """In a packed sequence (one row holding every image of every crop size) each image's
    branch is kept or dropped whole, each image drawn apart; not one draw for the row."""
    from dinofuse.engine.models.vit import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.25)
    forward = torch.compile(drop, backend="eager", fullgraph=True) if compiled else drop
    seqlens = ((1500, 5), (2500, 2))  # 4000 images: 1500 of 5 tokens, 2500 of 2
    x = torch.ones(1, 1500 * 5 + 2500 * 2, 3)
    y = forward(x, seqlens)[0]
    images = [y[:7500].reshape(1500, 5 * 3), y[7500:].reshape(2500, 2 * 3)]
    for image in images:
        assert (image == image[:, :1]).all()  # one draw per image, all its tokens
    first = torch.cat([image[:, 0] for image in images])
    assert first.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (first > 0).float().mean() == pytest.approx(0.75, abs=0.03)
    drop.eval()
    assert torch.equal(forward(x, seqlens), x)
    torch._dynamo.reset()


def test_blocks_give_drop_path_the_packed_layout(monkeypatch):
    """A packed training forward hands each block's drop path the sequence layout."""
    from dinofuse.engine.models.vit import DropPath

    seen = []
    forward = DropPath.forward

    def spy(self, x, seqlens=None):
        seen.append(seqlens)
        return forward(self, x, seqlens)

    monkeypatch.setattr(DropPath, "forward", spy)
    backbone = vit_tiny(depth=2, attention="sdpa", drop_path_rate=0.5)
    MultiCropWrapper(backbone, DINOHead(192, 30, hidden_dim=16, bottleneck_dim=8), packed=True)(
        [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3)
    assert seen == [((4, 5), (6, 2))] * 4  # two blocks, two branches each


@pytest.mark.parametrize("layer_norm", ["torch", "fused"])
@pytest.mark.parametrize("checkpointed", [0, 1, 3, -1])
def test_activation_checkpointing_recomputes_exactly_the_first_n_blocks(checkpointed, layer_norm):
    """Each checkpointed block runs its forward again in backward; the others do not, and the
    gradients are the ones of the plain forward. With our norms too, whose blocks pass each
    MLP branch on to the next norm."""
    torch.manual_seed(0)
    model = random_state(build_vit("vit_tiny", patch_size=8, depth=4, attention="sdpa",
                                   layer_norm=layer_norm))
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        # a pre-hook: the recomputation may stop early, before a forward hook would run
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.checkpoint_blocks = checkpointed
    loss = model(x).square().sum()
    assert calls == [1] * 4
    loss.backward()
    n = 4 if checkpointed < 0 else checkpointed
    assert calls == [2] * n + [1] * (4 - n)
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no recomputation to prepare without gradients
        model(x)
    assert calls == [3] * n + [2] * (4 - n)


@pytest.mark.parametrize("patch,in_chans,height,width", [(16, 3, 48, 80), (8, 1, 24, 8), (7, 3, 14, 35)])
def test_patch_embedding_as_matmul_equals_the_convolution(patch, in_chans, height, width):
    """Same weights, same math: float64 outputs and gradients equal to rounding."""
    embed = PatchEmbed(img_size=None, patch_size=patch, in_chans=in_chans, embed_dim=5,
                       strict_img_size=False).double()
    x = torch.randn(2, in_chans, height, width, dtype=torch.float64)
    results = []
    for as_matmul in (True, False):
        embed.as_matmul = as_matmul
        embed.zero_grad()
        out = embed(x)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape))
        results.append((out.detach(), embed.proj.weight.grad.clone(), embed.proj.bias.grad.clone()))
    assert results[0][0].shape == (2, (height // patch) * (width // patch), 5)
    for ours, conv in zip(*results):
        torch.testing.assert_close(ours, conv, rtol=1e-12, atol=1e-12)


def _copies_in_backward(split) -> int:
    """Copy kernels autograd runs to bring SDPA's q/k/v gradients back to the qkv layout."""
    qkv = torch.randn(2, 5, 3 * 4 * 8, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in split(qkv))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.profiler.profile() as prof:
        out.backward(torch.ones_like(out))
    return sum(e.name in ("aten::clone", "aten::copy_") for e in prof.events())


def test_qkv_gradient_needs_no_copy_after_the_stack():
    def official(qkv):  # the official layout: permute(2, 0, 3, 1, 4).unbind(0), as (B, N, H, d)
        B, N, _ = qkv.shape
        return [t.transpose(1, 2) for t in qkv.reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)]

    assert _copies_in_backward(official) > 0  # what the count would catch
    assert _copies_in_backward(lambda qkv: split_qkv(qkv, 4)) == 0


def test_residual_stream_in_the_autocast_dtype(monkeypatch):
    """residual_dtype="autocast": under bf16 autocast every block gets bf16 tokens and every
    LayerNorm runs on bf16 tensors (input, weight, bias: not autocast's fp32 LayerNorm);
    outputs and gradients stay close to the fp32 stream; without autocast nothing changes."""
    torch.manual_seed(0)
    fp32_stream = random_state(vit_tiny(depth=3, attention="sdpa"))
    low = vit_tiny(depth=3, attention="sdpa", residual_dtype="autocast")
    low.load_state_dict(fp32_stream.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(low(x), fp32_stream(x), rtol=0, atol=0)

    seen, norms = [], []
    for block in low.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out[0].dtype)))
    layer_norm = torch.nn.functional.layer_norm

    def recorded(x, shape, weight, bias, eps):
        norms.append((x.dtype, weight.dtype, bias.dtype, torch.is_autocast_enabled("cpu")))
        return layer_norm(x, shape, weight, bias, eps)

    outs, grads = [], []
    for model in (fp32_stream, low):
        if model is low:
            monkeypatch.setattr(torch.nn.functional, "layer_norm", recorded)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)
    assert len(norms) == 2 * 3 + 1 and set(norms) == {(torch.bfloat16,) * 3 + (False,)}
    assert all(p.grad.dtype == torch.float32 for p in low.parameters())
    torch.testing.assert_close(outs[1], outs[0], rtol=0.05, atol=0.05)
    assert torch.nn.functional.cosine_similarity(grads[1], grads[0], dim=0) > 0.99


def _ours_against_torchs(option: str):
    """Two 2-block ViTs with the same random weights, `option` ("layer_norm", "bias_gelu")
    "fused" (our kernel, interpreted here) in one and "torch" in the other: their outputs
    and gradients on the same images agree. Returns (ours, theirs, the images)."""
    torch.manual_seed(0)
    ours = random_state(vit_tiny(depth=2, attention="sdpa", **{option: "fused"}))
    theirs = vit_tiny(depth=2, attention="sdpa", **{option: "torch"})
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs, grads = [], []
    for model in (ours, theirs):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)
    return ours, theirs, x


def _count_fused_layer_norms(monkeypatch) -> list:
    """Each call of our kernels: ("norm" or "add+norm", input dtype, output dtype)."""
    from dinofuse.kernels.layer_norm import AddLayerNormFunction, LayerNormFunction

    calls, apply, add_apply = [], LayerNormFunction.apply, AddLayerNormFunction.apply

    def counted(x, weight, bias, eps, out_dtype):
        calls.append(("norm", x.dtype, out_dtype))
        return apply(x, weight, bias, eps, out_dtype)

    def add_counted(x, residual, weight, bias, scale, eps, out_dtype):
        calls.append(("add+norm", x.dtype, out_dtype))
        return add_apply(x, residual, weight, bias, scale, eps, out_dtype)

    monkeypatch.setattr(LayerNormFunction, "apply", counted)
    monkeypatch.setattr(AddLayerNormFunction, "apply", add_counted)
    return calls


def test_fused_layer_norm_gives_torchs_outputs_and_gradients(monkeypatch):
    """layer_norm="fused" (the Triton kernel, here under the interpreter) against torch's:
    every norm runs it; fp32 outputs and gradients agree; under bf16 autocast the norms that
    feed a matmul write bf16 and the final one fp32, as autocast's cast and LayerNorm give."""
    calls = _count_fused_layer_norms(monkeypatch)
    ours, theirs, x = _ours_against_torchs("layer_norm")
    assert len(calls) == 2 * 2 + 1
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
        expected = theirs(x)
    # every residual add inside a norm's kernel: the first block's norm1 has none before it,
    # each block's MLP branch is added by the next norm1, the last by the final norm (fp32)
    f32, bf16 = torch.float32, torch.bfloat16
    assert calls == [("norm", f32, bf16)] + [("add+norm", f32, bf16)] * 3 + [("add+norm", f32, f32)]
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("packed", [False, True])
def test_the_fused_residual_add_drops_paths_as_the_plain_block(packed, monkeypatch):
    """Training with stochastic depth: the blocks' residual add inside our norm kernel draws
    the same per-image factors as the plain `x + drop_path(y)` and gives its outputs and
    gradients, per resolution and packed."""
    calls = _count_fused_layer_norms(monkeypatch)
    torch.manual_seed(0)
    models = {}
    for kernel in ("fused", "torch"):
        backbone = vit_tiny(depth=3, attention="sdpa", drop_path_rate=0.6, layer_norm=kernel)
        models[kernel] = MultiCropWrapper(backbone, DINOHead(192, 40, hidden_dim=16, bottleneck_dim=8),
                                          packed=packed)
    random_state(models["fused"])
    models["torch"].load_state_dict(models["fused"].state_dict())
    crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 3
    outs, grads = {}, {}
    for kernel, model in models.items():
        torch.manual_seed(7)
        outs[kernel] = model(crops)
        outs[kernel].square().sum().backward()
        grads[kernel] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert ("add+norm", torch.float32, torch.float32) in calls
    torch.testing.assert_close(outs["fused"], outs["torch"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["fused"], grads["torch"], rtol=1e-3, atol=1e-5)
    torch.manual_seed(8)  # another draw: another result (the factors are drawn, not fixed)
    assert not torch.allclose(models["fused"](crops), outs["fused"])


def test_auto_layer_norm_is_torchs_on_the_cpu_and_under_torch_compile(monkeypatch):
    """"auto" runs ours on CUDA only; torch.compile traces torch's layer norm (its generated
    kernels fuse the norm with its neighbours) even where ours was asked for."""
    calls = _count_fused_layer_norms(monkeypatch)
    vit_tiny(depth=1, attention="sdpa")(torch.randn(1, 3, 32, 32))
    assert calls == []
    block = vit_tiny(depth=1, attention="sdpa", layer_norm="fused").blocks[0]
    x = torch.randn(2, 5, block.norm1.normalized_shape[0])
    expected = block(x)[0]
    assert len(calls) == 2
    graphs = []

    def backend(gm, example_inputs):  # what dynamo traced, run as traced
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(block, backend=backend, fullgraph=True)(x)[0]
    finally:
        torch._dynamo.reset()
    assert len(calls) == 2
    traced = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert traced and not [t for t in traced if "dinofuse" in t], traced  # torch's norm traced
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_fused_bias_gelu_gives_torchs_outputs_and_gradients(monkeypatch):
    """bias_gelu="fused" (fc1 without its bias, then our bias + GELU kernel, interpreted
    here) against timm's MLP: outputs and every gradient (fc1's bias included); under bf16
    autocast the kernel gets fc1's bf16 output and writes bf16 for fc2; "auto" is torch's
    on the CPU and under torch.compile."""
    from dinofuse.kernels.bias_gelu import BiasGELUFunction

    calls, apply = [], BiasGELUFunction.apply
    monkeypatch.setattr(BiasGELUFunction, "apply",
                        lambda a, b, dtype: calls.append((a.dtype, dtype)) or apply(a, b, dtype))
    ours, theirs, x = _ours_against_torchs("bias_gelu")
    assert calls == [(torch.float32, torch.float32)] * 2
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = ours(x), theirs(x)
    assert calls == [(torch.bfloat16, torch.bfloat16)] * 2
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    calls.clear()
    vit_tiny(depth=1, attention="sdpa")(torch.randn(1, 3, 32, 32))  # auto on the CPU
    mlp = ours.blocks[0].mlp
    torch._dynamo.reset()
    try:
        torch.compile(mlp, backend="eager", fullgraph=True)(torch.randn(2, 5, 192))
    finally:
        torch._dynamo.reset()
    assert calls == []
