"""DINO projection head: MLP, L2 normalization, weight-normalized prototypes layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are weight_g * weight_v / ||weight_v||.

    The parameter names (`weight_g`, `weight_v`) are those of `torch.nn.utils.weight_norm`
    in official checkpoints, without that function's forward hooks (which FSDP2 and
    torch.compile handle poorly).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        weight = nn.Linear(in_features, out_features, bias=False).weight.detach()  # torch's init
        self.weight_v = nn.Parameter(weight.clone())
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) that gradients flow through: every rank's loss depends on every
    rank's samples through the sum, so its gradient is the ranks' gradients summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _ranks() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BatchNorm1dAcrossRanks(nn.BatchNorm1d):
    """nn.BatchNorm1d (its parameters and buffers, official names) whose training statistics
    cover the samples of every rank, as the official code's SyncBatchNorm does under several
    processes: two ranks equal one process with the global batch. torch's SyncBatchNorm
    refuses CPU tensors; this runs on both. The normalization is computed in float32, so it
    also runs where FSDP2 has cast the parameters to bf16 but not the running statistics
    (in the running statistics' dtype, float32, or the input's when wider)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dtype = torch.promote_types(x.dtype, self.running_mean.dtype)  # float32 at least
        xf, weight, bias = x.to(dtype), self.weight.to(dtype), self.bias.to(dtype)
        if not self.training or _ranks() == 1:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(xf, self.running_mean, self.running_var, weight, bias,
                                self.training, self.momentum, self.eps).to(x.dtype)
        # the mean first, then the spread around it: two small all-reduces, no cancellation
        sum_and_count = _SumOverRanks.apply(
            torch.cat([xf.sum(0), xf.new_full((1,), xf.shape[0])]))
        n = sum_and_count[-1].detach()
        mean = sum_and_count[:-1] / n
        var = _SumOverRanks.apply(((xf - mean) ** 2).sum(0)) / n
        with torch.no_grad():  # torch's update: the unbiased variance, the momentum
            self.num_batches_tracked.add_(1)
            unbiased = var * n / (n - 1).clamp(min=1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return ((xf - mean) * torch.rsqrt(var + self.eps) * weight + bias).to(x.dtype)


class DINOHead(nn.Module):
    """in -> hidden -> ... -> bottleneck (MLP with GELU, optional BN), L2-normalize, -> K.

    With norm_last_layer (the default) weight_g is fixed at 1, so the prototypes are unit
    vectors. Module indices inside `mlp` follow the official head, so official state dicts
    load as they are.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(BatchNorm1dAcrossRanks(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        # created after the init above, so its direction keeps torch's default Linear init
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def cancel_last_layer_gradients(head_or_model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """The official last-layer freeze: drop gradients of `last_layer` while epoch < freeze."""
    if epoch >= freeze_epochs:
        return
    for name, p in head_or_model.named_parameters():
        if "last_layer" in name:
            p.grad = None
