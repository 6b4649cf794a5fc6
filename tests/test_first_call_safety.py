"""A key's first call (timing, autotuning, the first launches, the self-check) cannot hurt a run:

- two threads meeting the same new key at once (``nn.DataParallel`` runs one per GPU) both get right results: first
  calls run under one process-wide lock, because triton's autotuner keeps the call's arguments on the shared kernel
  object while it benchmarks (``Autotuner.run``: ``self.nargs``, ``restore_copies``) and its benchmark releases the
  GIL. Triton's interpreter is not thread-safe itself, so the kernels here are stand-ins with that same race;
- during CUDA graph capture a new key, or a dropout seed on the host, is refused with what to do instead (their
  synchronisations are illegal there), while a warmed-up key captures;
- fp16 loss scaling (GradScaler overflows on purpose in its first steps) raises no false alarm: an Inf where the
  same-dtype PyTorch computation overflows too is not a kernel fault.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import pytest
import torch
from helpers import DEVICE

import fused_lora
from fused_lora import FallbackWarning, LoRALinear, diagnostics, fallback, fused_lora_linear
from fused_lora.backends import lora_triton, path_state


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.setenv("FUSED_LORA_GEMM", "fused")
    monkeypatch.setattr(fallback, "_warned", set())
    diagnostics.clear()
    yield
    fused_lora.set_verify(None)
    diagnostics.clear()


class RacyTuner:
    """Stands for a kernel under triton's autotuner: on the first call of a shape it keeps the call's arguments on the
    shared object, benchmarks (sleeping: the GIL is released, as in ``do_bench``) and launches with the arguments it
    kept, as ``Autotuner.run`` does with ``self.nargs``. Computes with torch ops."""

    def __init__(self, compute):
        self.compute, self.tuned, self.nargs = compute, set(), None

    def __call__(self, *args):
        key = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
        if key not in self.tuned:
            self.nargs = args
            time.sleep(0.05)
            self.tuned.add(key)
            return self.compute(*self.nargs)
        return self.compute(*args)


def stand_in_kernels(monkeypatch):
    """The dense fused path's launchers as racy stand-ins (p = 0: no mask kernel)."""
    def w_nk(w, layout):
        return w if layout == "linear" else w.t()

    stand_ins = {
        "lora_down": lambda x, a, seed, p: x.float() @ a.float().t(),
        "lora_forward": lambda x, w, b, s, lb, scaling, layout: (
            x.float() @ w_nk(w, layout).float().t() + (0 if b is None else b.float()) + scaling * s @ lb.float().t()
        ).to(x.dtype),
        "lora_dy_pass": lambda dy, lb, s, scaling, need_ds, need_db, need_dbias: (
            scaling * dy.float() @ lb.float() if need_ds else None,
            scaling * dy.float().t() @ s if need_db else None, dy.float().sum(0) if need_dbias else None),
        "lora_dx": lambda dy, w, ds, a, layout, seed, p, dtype: (
            dy.float() @ w_nk(w, layout).float() + ds @ a.float()).to(dtype),
        "lora_da": lambda ds, x, a, seed, p: ds.t() @ x.float(),
    }
    for name, compute in stand_ins.items():
        monkeypatch.setattr(lora_triton, name, RacyTuner(compute))


def two_threads_at_once(seeds=(0, 1)) -> list:
    """Both threads run a forward+backward of the same new key at the same moment; each returns its error against
    its own fp64 reference (or the exception it met)."""
    barrier = threading.Barrier(len(seeds))
    results: list = [None] * len(seeds)

    def work(i, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(9, 40, generator=gen).requires_grad_()
        w, b = torch.randn(28, 40, generator=gen), torch.randn(28, generator=gen)
        A = torch.randn(6, 40, generator=gen).requires_grad_()
        B = torch.randn(28, 6, generator=gen).requires_grad_()
        try:
            barrier.wait()
            y = fused_lora_linear(x, w, b, A, B, 1.5, 0.0, backend="triton")
            y.square().sum().backward()
            y64 = (x.detach().double() @ w.double().t() + b.double()
                   + 1.5 * (x.detach().double() @ A.detach().double().t()) @ B.detach().double().t())
            dx64 = 2 * y64 @ (w.double() + 1.5 * B.detach().double() @ A.detach().double())
            results[i] = max(((y.double() - y64).abs().max() / y64.abs().max()).item(),
                             ((x.grad.double() - dx64).abs().max() / dx64.abs().max()).item())  # relative
        except Exception as err:  # noqa: BLE001 (a crash in the other thread is a result here)
            results[i] = err

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(seeds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_two_threads_on_a_new_key_both_get_right_results(monkeypatch):
    stand_in_kernels(monkeypatch)
    fused_lora.set_verify("off")
    results = two_threads_at_once()
    assert all(isinstance(r, float) and r < 1e-5 for r in results), results


def test_the_harness_sees_the_race_without_the_lock(monkeypatch):
    """The same two threads with the first-call lock taken away: one thread computes with the other's arguments."""
    stand_in_kernels(monkeypatch)
    fused_lora.set_verify("off")
    monkeypatch.setattr(path_state, "LOCK", contextlib.nullcontext())
    results = two_threads_at_once()
    assert any(isinstance(r, Exception) or r > 1e-2 for r in results), results


def test_a_new_key_during_capture_is_refused_and_a_warm_one_captures(monkeypatch):
    x, w, b = torch.randn(5, 24, device=DEVICE), torch.randn(16, 24, device=DEVICE), torch.randn(16, device=DEVICE)
    A = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    capturing = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    with pytest.raises(RuntimeError, match="Warm this shape up before capturing"):
        fused_lora_linear(x, w, b, A, B, 2.0, 0.1, dropout_seed=torch.tensor([3], device=DEVICE), backend="triton")
    capturing["on"] = False
    y = fused_lora_linear(x, w, b, A, B, 2.0, 0.1, backend="triton")  # the warm-up, eager
    y.sum().backward()
    capturing["on"] = True
    y = fused_lora_linear(x, w, b, A, B, 2.0, 0.1, backend="triton")  # warm: launches only, nothing synchronises
    y.sum().backward()


@pytest.mark.parametrize("seed", [5, torch.tensor([5])], ids=["int", "host-tensor"])
def test_a_host_seed_during_capture_is_refused(monkeypatch, seed):
    """Copying a host seed to the GPU synchronises, and the graph would replay its one mask: refused before any copy
    (the call is on a GPU; nothing of it runs here)."""
    from fused_lora.dropout import seed_tensor

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured.*Leave dropout_seed=None"):
        seed_tensor(0.1, seed, torch.device("cuda"))


def test_fp16_loss_scaling_raises_no_false_alarm():
    """GradScaler's first steps overflow on purpose: dX overflows fp16 in the kernels and in PyTorch's same-dtype
    computation alike. The key keeps its path and no warning is raised; the scaler skips those steps itself."""
    fused_lora.set_verify("always")
    torch.manual_seed(0)
    layer = LoRALinear(40, 28, r=6, lora_alpha=12, dtype=torch.float16, init_lora_weights=False).to(DEVICE)
    with torch.no_grad():
        layer.weight.mul_(8)  # dX ≈ 7·|dY|: overflows fp16 where dY does not
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=1e-3)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**20)
    x = torch.randn(13, 40, device=DEVICE, dtype=torch.float16, requires_grad=True)
    target = torch.randn(13, 28, device=DEVICE, dtype=torch.float16)
    scales = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        for _ in range(3):
            opt.zero_grad()
            x.grad = None
            loss = torch.nn.functional.mse_loss(layer(x).float(), target.float())
            scaler.scale(loss).backward()
            scales.append((scaler.get_scale(), bool(torch.isinf(x.grad).any())))
            scaler.step(opt)
            scaler.update()
    assert scales[0][1], "the first step's dX overflowed (what the test is about)"
    (entry,) = diagnostics.path_report().values()
    assert entry["runs"] == "fused" and entry["demoted_to"] is None
    assert all(v["ok"] for v in entry["verified"]["fused"].values())


def test_out_of_memory_in_a_check_skips_it_and_never_fails_the_step(monkeypatch):
    """The check's references need memory of their own: when they cannot have it, the check is skipped with one
    warning (kept in the path table), and the step goes on with the path's result."""
    from fused_lora.backends import self_check

    fused_lora.set_verify("first")

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB")

    monkeypatch.setattr(self_check, "compare", no_memory)
    x, w, b = torch.randn(5, 24, device=DEVICE), torch.randn(16, 24, device=DEVICE), torch.randn(16, device=DEVICE)
    A = torch.randn(4, 24, device=DEVICE, requires_grad=True)
    B = torch.randn(16, 4, device=DEVICE, requires_grad=True)
    with pytest.warns(FallbackWarning, match="self-check of the fused path's forward was skipped .*out of memory"):
        y = fused_lora_linear(x, w, b, A, B, 2.0, 0.0, backend="triton")
        y.sum().backward()
    (entry,) = diagnostics.path_report().values()
    assert set(entry["skipped"]) == {"fused forward", "fused backward:dA,dB"} and entry["runs"] == "fused"
    torch.testing.assert_close(y, x @ w.t() + b + 2.0 * (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5)
