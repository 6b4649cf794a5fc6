"""Prototype measured in NOTES.md (not used by the package): a CPU dropout path for the fused LoRA layer with
the keep mask drawn from 64-bit random words cut into 16-bit lanes, generated once in forward and saved
bit-packed (M·K/8 bytes) instead of regenerated in backward. Assumes M·K divisible by 8 and a bias.

    from prototype_packed_mask import proto2_lora
    y = proto2_lora(x, W, b, A, B, scaling, p)
"""
import torch

_W = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
_SH = torch.arange(8, dtype=torch.uint8)


def keep_bool(seed, M, K, p):
    g = torch.Generator().manual_seed(seed)
    n = M * K
    w = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=g)
    drop = round(p * 65536)
    return w.view(torch.int16)[:n].view(M, K) >= drop - 32768, drop / 65536


def pack(m):  # M*K divisible by 8 assumed in the prototype
    u = m.reshape(-1, 8).view(torch.uint8)
    out = u[:, 0].clone()
    for i in range(1, 8):
        out |= u[:, i] << i
    return out


def unpack(pk, M, K, dtype):
    return ((pk.unsqueeze(1) >> _SH) & 1).view(M, K).to(dtype)


class Proto2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, A, B, s, p, seed):
        y = torch.addmm(b, x, W.t()) if b is not None else x @ W.t()
        if p > 0:
            keep, pe = keep_bool(seed, *x.shape, p)
            c = 1 / (1 - pe)
            S = (torch.where(keep, x, 0.0) @ A.t()).mul_(c)
            packed = pack(keep)
        else:
            S, packed, c = x @ A.t(), None, 1.0
        y.addmm_(S, B.t(), alpha=s)
        ctx.save_for_backward(x, W, A, B, S, packed)
        ctx.s, ctx.p, ctx.c = s, p, c
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, S, packed = ctx.saved_tensors
        s, c = ctx.s, ctx.c
        dB = (dy.t() @ S).mul_(s)
        dS = (dy @ B).mul_(s)
        dx = dy @ W
        if packed is not None:
            keep = unpack(packed, *x.shape, x.dtype)
            dA = (dS.t() @ (keep * x)).mul_(c)
            dx.addcmul_(dS @ A, keep, value=c)
        else:
            dA = dS.t() @ x
            dx.addmm_(dS, A)
        return dx, None, None, dA, dB, None, None, None


def proto2_lora(x, W, b, A, B, s, p):
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else 0
    return Proto2.apply(x, W, b, A, B, s, p, seed)
