"""Every autograd mode PEFT supports works here too: backward(create_graph=True) (gradient penalties,
Hessian-vector products), torch.func.grad / vmap(grad) (per-sample gradients), forward-mode AD (torch.func.jvp,
torch.autograd.forward_ad) and dropout p = 1. Each is compared with the plain-op reference on both backends.
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, DEVICE
from test_functional import make_problem

from fused_lora import LoRAConfig, LoRALinear, dropout_mask, fused_lora_linear, inject_lora, lora_linear_ref

peft = pytest.importorskip("peft")


def problem(dtype=torch.float32, layout="linear", seed=0, device="cpu"):
    return make_problem((2, 7), 12, 10, 3, dtype, layout, True, seed=seed, device=device)


def leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def penalty(fn, x, weight, bias, lora_A, lora_B):
    """A gradient penalty: d/dθ ‖∂L/∂(x, A, B)‖², through a first backward with create_graph=True."""
    y = fn(x, weight, bias, lora_A, lora_B)
    loss = (y.square() * torch.linspace(0.5, 1.5, y.shape[-1], dtype=y.dtype, device=y.device)).sum()
    grads = torch.autograd.grad(loss, (x, lora_A, lora_B, bias), create_graph=True)
    (sum(g.square().sum() for g in grads) + loss).backward()
    return [t.grad for t in (x, lora_A, lora_B, bias)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_matches_reference(backend, layout, p):
    dtype = torch.float32
    tensors = problem(dtype, layout, device=DEVICE)
    mask = dropout_mask(11, (14, 12), p, DEVICE, backend=backend).view(2, 7, 12).to(dtype) if p > 0 else None
    fused = penalty(lambda *t: fused_lora_linear(*t, 1.5, p, weight_layout=layout, dropout_seed=11,
                                                 backend=backend), *leaves(tensors))
    ref = penalty(lambda *t: lora_linear_ref(*t, 1.5, weight_layout=layout, dropout_mask=mask), *leaves(tensors))
    for got, want in zip(fused, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_hessian_vector_product():
    x, weight, bias, lora_A, lora_B = problem()

    def loss(a, b):
        return fused_lora_linear(x.detach(), weight, bias.detach(), a, b, 2.0).pow(3).sum()

    def ref(a, b):
        return lora_linear_ref(x.detach(), weight, bias.detach(), a, b, 2.0).pow(3).sum()

    v = (torch.randn_like(lora_A), torch.randn_like(lora_B))
    got = torch.autograd.functional.hvp(loss, (lora_A.detach(), lora_B.detach()), v)[1]
    want = torch.autograd.functional.hvp(ref, (lora_A.detach(), lora_B.detach()), v)[1]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_and_per_sample_vmap(backend):
    x, weight, bias, lora_A, lora_B = problem(torch.float32, device=DEVICE)
    x = x.detach()

    def loss(a, b, xs):
        return fused_lora_linear(xs, weight, None, a, b, 0.5, backend=backend).square().sum()

    def ref(a, b, xs):
        return lora_linear_ref(xs, weight, None, a, b, 0.5).square().sum()

    A, B = lora_A.detach(), lora_B.detach()
    got = torch.func.grad(loss, argnums=(0, 1))(A, B, x)
    want = torch.func.grad(ref, argnums=(0, 1))(A, B, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, None, 0))(A, B, x)
    per_sample_ref = torch.func.vmap(torch.func.grad(ref), in_dims=(None, None, 0))(A, B, x)
    assert per_sample.shape == (2, *A.shape)
    torch.testing.assert_close(per_sample, per_sample_ref)


def test_functional_call_grad_over_module_parameters():
    """Per-sample gradients the way Opacus-style code writes them: torch.func.functional_call on a LoRALinear."""
    torch.manual_seed(0)
    layer = LoRALinear(12, 10, r=3, lora_alpha=6, init_lora_weights=False)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(4, 12)

    def loss(params, xs):
        return torch.func.functional_call(layer, params, (xs,)).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(4):
        layer.zero_grad()
        layer(x[i]).square().sum().backward()
        for name in params:
            torch.testing.assert_close(grads[name][i], getattr(layer, name).grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad(backend):
    x, weight, bias, lora_A, lora_B = (t.detach() for t in problem(device=DEVICE))
    tangent = torch.randn_like(lora_A)
    fn = lambda a: fused_lora_linear(x, weight, bias, a, lora_B, 1.5, backend=backend)  # noqa: E731
    ref = lambda a: lora_linear_ref(x, weight, bias, a, lora_B, 1.5)  # noqa: E731
    out, jvp = torch.func.jvp(fn, (lora_A,), (tangent,))
    out_ref, jvp_ref = torch.func.jvp(ref, (lora_A,), (tangent,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jvp, jvp_ref)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fn(fwAD.make_dual(lora_A, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, jvp_ref)
        plain = fn(lora_A)  # no tangent inside the dual level: the fused Function, not the plain ops
        assert plain.grad_fn is None or "FusedLoRAFunction" in type(plain.grad_fn).__name__


# ---------------------------------------------------------------------------------------------- dropout 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_drops_the_whole_branch(backend):
    x, weight, bias, lora_A, lora_B = problem(torch.float32, device=DEVICE)
    y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 1.0, backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))
    y.square().sum().backward()
    assert torch.count_nonzero(lora_A.grad) == 0 and torch.count_nonzero(lora_B.grad) == 0
    torch.testing.assert_close(x.grad, (2 * y) @ weight)
    eval_y = fused_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, 1.0, training=False, backend=backend)
    torch.testing.assert_close(eval_y, lora_linear_ref(x, weight, bias, lora_A, lora_B, 2.0))


def test_dropout_one_same_as_peft():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    config = dict(r=2, lora_alpha=4, lora_dropout=1.0, target_modules=["0", "2"], init_lora_weights=False)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**config))
    ours = inject_lora(torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4)),
                       LoRAConfig(**config))
    ours.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", "")
                          .replace(".default", "").replace("lora_A.weight", "lora_A")
                          .replace("lora_B.weight", "lora_B"): v for k, v in peft_model.state_dict().items()})
    x = torch.randn(5, 12)
    for model in (peft_model, ours):
        model.train()
        model(x).square().sum().backward()
    torch.testing.assert_close(ours(x), peft_model(x))
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.count_nonzero(p.grad) == 0, name
    ours.eval()
    peft_model.eval()
    torch.testing.assert_close(ours(x), peft_model(x))
    assert LoRALinear(4, 4, lora_dropout=1.0).lora_dropout == 1.0
