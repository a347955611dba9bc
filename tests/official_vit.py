"""A straightforward functional rewrite of the official DINO ViT forward, for parity tests.

It reads the weights from a state dict by their official names and follows the official
code step by step (materialized attention, scale after q @ k^T, the +0.1 position-embedding
resize with its width/height naming). Test code: never imported by the package."""

import math

import torch
import torch.nn.functional as F


def official_pos_embed(pos_embed, w, h, patch):
    # `w, h` are the official names of the image's dims 2 and 3 (B, nc, w, h = x.shape)
    N = pos_embed.shape[1] - 1
    npatch = (w // patch) * (h // patch)
    if npatch == N and w == h:
        return pos_embed
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    side = int(math.sqrt(N))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == grid.shape[-2] and int(h0) == grid.shape[-1]
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def official_vit_forward(sd, x, *, patch, heads, return_all=False, last_blocks=0):
    """The CLS output; all tokens (return_all); or, as the official get_intermediate_layers,
    the list of each of the last `last_blocks` blocks' tokens through the final norm."""
    B, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + official_pos_embed(sd["pos_embed"], w, h, patch)
    D = t.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    scale = (D // heads) ** -0.5
    final_norm = lambda t: F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)  # noqa: E731
    intermediate = []
    for i in range(depth):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        N = y.shape[1]
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, D)
        t = t + F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                     p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + y
        if depth - i <= last_blocks:
            intermediate.append(final_norm(t))
    if last_blocks:
        return intermediate
    t = final_norm(t)
    return t if return_all else t[:, 0]


def official_pretrained_weights(path, checkpoint_key=None):
    """What the official evaluation scripts (`--pretrained_weights PATH --checkpoint_key
    teacher`) load from a file, as their `load_pretrained_weights` does: torch.load (with
    torch's default now, weights_only), the key's entry when the file has it, then every
    `module.` and `backbone.` taken out of the names; they load it with strict=False."""
    state = torch.load(path, map_location="cpu")
    if checkpoint_key is not None and checkpoint_key in state:
        state = state[checkpoint_key]
    state = {k.replace("module.", ""): v for k, v in state.items()}
    return {k.replace("backbone.", ""): v for k, v in state.items()}
