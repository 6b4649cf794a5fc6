"""Smoke test of an INSTALLED fused-lora (from the wheel or the sdist), run by .ci/run outside the checkout.

    cp .ci/installed_smoke.py /tmp/x/ && cd /tmp/x && /path/to/venv/bin/python installed_smoke.py

The venv must hold torch, fused-lora installed from a built wheel or sdist with its [test] extra (peft,
bitsandbytes) and nothing of the checkout: no editable install, the working directory outside the tree. Only the
public API is used. Checks, on CPU (the Triton kernels through Triton's interpreter):

1. the import comes from the venv's site-packages, the install is not editable and ships no top-level ``kernels``
   package (HF's ``kernels``, which transformers imports, would be shadowed), and every module of the package imports;
2. LoRA, DoRA and QLoRA (a bitsandbytes NF4 ``Linear4bit`` quantized on CPU) forward + backward on both backends,
   with dropout, odd shapes and a leading batch dim, against ``lora_linear_ref`` / ``dora_ref`` in fp64;
3. ``inject_lora`` on a tiny GPT-2 built from a config (no Hub), a training step, ``save_adapter``, and PEFT's
   ``PeftModel.from_pretrained`` giving the same logits;
4. ``fused_lora.peft.enable()``: ``get_peft_model`` builds layers that run the fused Function, with PEFT's logits.

Not a pytest file (it lives outside tests/ and defines no test functions): exit status 0 when every check passes.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton or fused_lora is imported: triton.jit reads it at decoration

import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import fused_lora  # noqa: E402

# A wrong kernel (a lost rank-r term, a wrong mask or scale) is off by the order of the result; fp32 rounding over
# these sizes is ~1e-6 of it. 1e-4 of the largest reference value is loose for rounding and tight for any bug.
REL = 1e-4
STARTED = time.perf_counter()


def step(name: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {name}", flush=True)


def close(what: str, got: torch.Tensor | None, ref: torch.Tensor | None) -> None:
    assert got is not None and ref is not None, f"{what}: missing ({got is None=}, {ref is None=})"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs().max().item()
    bound = REL * max(ref.abs().max().item(), 1e-3)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} against the fp64 reference"


def check_installed() -> None:
    step("installed: site-packages, not editable, no top-level kernels/, every module imports")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (fused_lora, importlib.import_module("fused_lora.kernels.lora_forward")):
        where = Path(module.__file__).resolve()
        assert where.is_relative_to(site), f"{module.__name__} imported from {where}, not from {site}"
    for entry in sys.path:  # nothing of a checkout on the path: the working directory, PYTHONPATH, a .pth file
        where = Path(entry or ".").resolve()
        assert where == site or not (where / "fused_lora").is_dir(), f"a fused_lora folder on sys.path: {where}"
    dist = importlib.metadata.distribution("fused-lora")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    assert not direct.get("dir_info", {}).get("editable"), f"an editable install: {direct}"
    files = [str(f) for f in dist.files or ()]
    assert any(f.startswith("fused_lora/kernels/") for f in files), "the kernels are missing from the install"
    top = sorted({f.split("/")[0] for f in files if not f.startswith(("fused_lora", "../"))})
    assert top == [], f"files outside the fused_lora package: {top}"  # a top-level kernels/ would shadow HF's
    assert not any("__editable__" in f.name for f in site.iterdir()), "an editable finder is in site-packages"
    kernels = importlib.import_module("fused_lora.kernels")  # a namespace folder: walk_packages does not enter it
    names = [m.name for m in pkgutil.walk_packages(fused_lora.__path__, "fused_lora.")]
    names += [m.name for m in pkgutil.iter_modules(kernels.__path__, "fused_lora.kernels.")]
    for name in names:
        importlib.import_module(name)
    for needed in ("fused_lora.autograd", "fused_lora.backends", "fused_lora.kernels.lora_backward"):
        assert needed in names, f"{needed} is not installed ({len(names)} modules: {names})"
    print(f"    {fused_lora.__file__}; {len(names)} modules")


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def grads(*tensors: torch.Tensor) -> list[torch.Tensor | None]:
    return [t.grad for t in tensors]


def ran_triton_kernels(before: dict) -> None:
    """path_report(): the call's key ran a Triton path ("fused" or "composed"), not the PyTorch fallback."""
    new = {k: v["runs"] for k, v in fused_lora.diagnostics.path_report().items() if k not in before}
    assert new and all(path in ("fused", "composed") for path in new.values()), f"Triton paths not run: {new}"


def check_functional(backend: str, dora: bool) -> None:
    """fused_lora_linear with dropout on an odd shape with a leading batch dim, against the fp64 reference fed the
    mask the backend drew (dropout_mask of the same seed)."""
    step(f"{'DoRA' if dora else 'LoRA'} forward + backward, backend={backend}")
    g = torch.Generator().manual_seed(1)
    M0, M1, K, N, r, p, seed, scaling = 3, 5, 37, 29, 6, 0.25, 7, 1.5
    x, w, b = torch.randn(M0, M1, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
    mag = (w + scaling * B @ A).norm(dim=1) * (1 + 0.3 * torch.rand(N, generator=g))
    gy = torch.randn(M0, M1, N, generator=g)
    xs, bs, As, Bs, ms = leaves(x, b, A, B, mag)
    extra = {"magnitude": ms} if dora else {}
    before = fused_lora.diagnostics.path_report()
    y = fused_lora.fused_lora_linear(xs, w, bs, As, Bs, scaling, p, True, dropout_seed=seed, backend=backend, **extra)
    y.backward(gy)
    if backend == "triton":
        ran_triton_kernels(before)
    mask = fused_lora.dropout_mask(seed, (M0 * M1, K), p, backend=backend).view(M0, M1, K)
    assert 0 < (mask == 0).sum() < mask.numel(), "the dropout mask drops nothing or everything"
    xr, br, Ar, Br, mr = leaves(*(t.double() for t in (x, b, A, B, mag)))
    if dora:
        ref = fused_lora.dora_ref(xr, w.double(), br, Ar, Br, mr, scaling, p, True, dropout_mask=mask.double(),
                                  upcast=torch.float64)
    else:
        ref = fused_lora.lora_linear_ref(xr, w.double(), br, Ar, Br, scaling, p, True, dropout_mask=mask.double(),
                                         upcast=torch.float64)
    ref.backward(gy.double())
    close("y", y.detach(), ref.detach())
    names = ["dx", "dbias", "dA", "dB", "dmagnitude"][: 5 if dora else 4]
    for name, got, want in zip(names, grads(xs, bs, As, Bs, ms), grads(xr, br, Ar, Br, mr), strict=False):
        close(name, got, want)


def check_qlora(backend: str) -> None:
    """quantized_lora on a bitsandbytes NF4 Linear4bit (double quantization) quantized on CPU, against fp64 on the
    weight bitsandbytes dequantizes. K is a multiple of the blocksize (64): bitsandbytes' CPU dequantize_4bit reads
    the wrong scale where a block spans two rows, which would make this reference wrong, not the kernels."""
    step(f"QLoRA (bitsandbytes NF4 Linear4bit) forward + backward, backend={backend}")
    import bitsandbytes as bnb

    from fused_lora.quantized import quantized_lora

    g = torch.Generator().manual_seed(2)
    M0, M1, K, N, r, p, seed, scaling = 3, 7, 128, 33, 5, 0.2, 11, 2.0
    torch.manual_seed(0)
    dense = torch.nn.Linear(K, N)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes on .to(device)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    quantization_error = (w - dense.weight.double()).abs().max()  # NF4's 16 levels: up to ~15% of the largest weight
    assert w.shape == (N, K) and 0 < quantization_error < 0.3 * dense.weight.abs().max(), quantization_error
    x, A = torch.randn(M0, M1, K, generator=g), torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g)
    gy = torch.randn(M0, M1, N, generator=g)
    xs, As, Bs = leaves(x, A, B)
    before = fused_lora.diagnostics.path_report()
    y = quantized_lora(xs, layer, As, Bs, scaling, p, True, dropout_seed=seed, backend=backend)
    y.backward(gy)
    if backend == "triton":
        ran_triton_kernels(before)
    mask = fused_lora.dropout_mask(seed, (M0 * M1, K), p, backend=backend).view(M0, M1, K)
    xr, Ar, Br = leaves(x.double(), A.double(), B.double())
    ref = fused_lora.lora_linear_ref(xr, w, layer.bias.detach().double(), Ar, Br, scaling, p, True,
                                     dropout_mask=mask.double(), upcast=torch.float64)
    ref.backward(gy.double())
    close("y", y.detach(), ref.detach())
    for name, got, want in zip(("dx", "dA", "dB"), grads(xs, As, Bs), grads(xr, Ar, Br), strict=True):
        close(name, got, want)
    assert layer.weight.grad is None


def tiny_gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def check_inject_save_peft_load() -> None:
    step("inject_lora on a tiny GPT-2, a training step, save_adapter, PeftModel.from_pretrained")
    import peft

    model = tiny_gpt2()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = fused_lora.LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    model = fused_lora.inject_lora(model, config)
    lora = [m for m in model.modules() if isinstance(m, fused_lora.LoRALinear)]
    assert len(lora) == 4, f"{len(lora)} LoRALinear layers, 4 expected (c_attn and c_fc in 2 blocks)"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
        assert p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0), n
    with torch.no_grad():
        for layer in lora:  # a trained-looking adapter: the comparison below must see the LoRA term
            layer.lora_B.normal_(std=0.5)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        fused_lora.save_adapter(model, tmp)
        base = tiny_gpt2()
        base.load_state_dict(base_state)
        with torch.no_grad():
            plain = base(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(base, tmp).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2, "the adapters change nothing: the comparison would prove nothing"
    close("PEFT-loaded logits", ours, theirs)


def check_peft_enable() -> None:
    step("fused_lora.peft.enable(): get_peft_model builds fused layers, PEFT's logits")
    import peft

    import fused_lora.peft as flp

    def build():
        model = tiny_gpt2()
        torch.manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: "fan_in_fan_out is set to False but the target module is Conv1D"
            return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              init_lora_weights=False))

    plain = build()
    flp.enable()
    try:
        fused = build()
    finally:
        flp.disable()
    assert flp.is_accelerated(fused) and not flp.is_accelerated(plain)
    layers = [m for m in fused.modules() if isinstance(m, flp.FusedLinear)]
    assert len(layers) == 2, f"{len(layers)} fused PEFT layers, 2 expected"
    ran = []
    for layer in layers:
        layer.register_forward_hook(lambda _m, _i, out: ran.append(type(out.grad_fn).__name__))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    fused.train()
    fused(input_ids=ids, labels=ids).loss.backward()
    assert ran == ["FusedLoRAFunctionBackward"] * 2, f"the PEFT layers did not run the fused Function: {ran}"
    fused.eval(), plain.eval()
    with torch.no_grad():
        close("enabled PEFT logits", fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def main() -> int:
    check_installed()
    for backend in ("torch", "triton"):
        check_functional(backend, dora=False)
        check_functional(backend, dora=True)
        check_qlora(backend)
    check_inject_save_peft_load()
    check_peft_enable()
    step(f"installed fused-lora {fused_lora.__version__}: every check passed (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
