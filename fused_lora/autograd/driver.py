"""The autograd driver: one Function for every variant (LoRA, DoRA) on every base kind, and what runs each call.

    FusedLoRAFunction.apply(call, x, weight, bias, lora_A, lora_B, magnitude, seed, base) -> y

``call`` is the router's record (``fused_lora.call.Call``: variant, base kind, layout, scaling, p, backend, path,
candidates); the tensors are the call's. Per call, in one place for every variant:

1. the PyTorch backend runs the kind's ``torch`` pass (its own dropout mask from the seed) and that is all;
2. on the Triton backend the call's key (:func:`key_of`) finds its record in the path table (``path_state``): the path
   it runs (``auto`` timed once per key among the candidates, ``path_choice``; moved on by failed checks and by kernels
   that cannot run), whether a check is due;
3. the pass runs with autocast off (the Function has chosen the dtypes); a kernel that cannot be built or launched on
   this device (``kernel_errors``) hands the call to the next path, for good;
4. a due check compares the result with the PyTorch path (``self_check``) and returns the PyTorch path's result when
   the path is wrong;
5. ``backward(create_graph=True)`` runs the variant's differentiable backward with the forward's mask
   (``masks.scaled``); under ``torch.compile`` the two directions are the custom ops ``fused_lora::forward`` /
   ``fused_lora::backward`` (one opaque node per direction, no graph break, for every variant and base kind).

First calls of a key (timing, autotuning, checks) run under ``path_state.LOCK`` and are refused during CUDA graph
capture, where their synchronisations are illegal (warm the shape up before capturing); the steady state takes no lock.
Saved for backward: x, the parameters, the seed and what the variant saves (S; DoRA: P, the row norms). No mask and no
dropped copy of x.
"""

from __future__ import annotations

import torch

from .. import bases
from ..backends import lora_torch, masks, path_choice, path_state, self_check
from ..backends.dense_base import DenseBase
from ..backends.kernel_errors import KERNEL_FAILURES, first_line
from ..backends.self_check import Dense64, Recording, Replay, row_blocks, row_chunks, take_rows
from ..backends.triton_launch import on_device
from ..call import Call, Operands
from ..fallback import warn_fallback
from ..hardware import capturing, device_name
from ..kernels.configs import m_bucket
from .variants import VARIANTS

# ------------------------------------------------------------------------------------------------- call records

_call_index: dict[tuple, Call] = {}


def call_record(variant: str, kind: bases.BaseKind, layout: str, scaling: float, p: float, backend: str, path: str,
                candidates: tuple[str, ...], scalings: tuple[float, ...] = (), ps: tuple[float, ...] = ()) -> Call:
    """The one record for these values (made once, kept: a layer's steady state builds none). ``scalings``/``ps``: the
    multi variant's per-adapter values."""
    if torch.compiler.is_compiling():  # traced: a constant of the graph (a cache filled while tracing breaks guards)
        return Call(VARIANTS[variant], kind, layout, scaling, p, backend, path, candidates, scalings, ps)
    index = (variant, kind.name, id(kind), layout, scaling, p, backend, path, candidates, scalings, ps)
    call = _call_index.get(index)
    if call is None:
        call = _call_index[index] = Call(VARIANTS[variant], kind, layout, scaling, p, backend, path, candidates,
                                         scalings, ps)
    return call


def base_handle(base) -> int:
    """An integer naming a quantized base object for the custom ops (-1: none): an attribute ``bases.base_of`` set."""
    return -1 if base is None else base.handle


# -------------------------------------------------------------------------------------------------------- keys

_keys: dict[tuple, str] = {}


def key_of(call: Call, t: Operands, has_bias: bool) -> str:
    """The path table's key: what changes which path is fastest or whether a path is right (a string, for the choices
    file). Made once per shape and kept (this runs on every Triton-backend call)."""
    x = t.x
    dims = call.variant.key_dims(t)  # (adapter dtype, N, rank[s], …)
    parts = (call.variant.name, call.kind.name, x.device, x.dtype, call.layout, x.shape[1], dims,
             m_bucket(x.shape[0]), call.p > 0, has_bias, call.ps)
    k = _keys.get(parts)
    if k is None:
        variant, kind, device, dtype, layout, K, dims, M, drop, bias, _ = parts
        name = variant if kind == bases.DENSE else f"{variant}-{kind}"
        k = _keys[parts] = (f"{name}|{device_name(device)}|{str(dtype).removeprefix('torch.')}"
                            f"|{str(dims[0]).removeprefix('torch.')}|{layout}|K{K}|N{dims[1]}"
                            f"|{call.variant.key_text(call, dims)}|M{M}"
                            f"{'|dropout' if drop else ''}{'|bias' if bias else ''}")
    return k


_states: dict[tuple, tuple[str, path_state.KeyState]] = {}
path_state._on_clear.append(_states.clear)


def state_of(call: Call, t: Operands, has_bias: bool) -> tuple[str, path_state.KeyState]:
    """(the key, its record) for a call: one lookup per call on what identifies the key (the call record is one object
    per route), the key's string made on the first."""
    x = t.x
    parts = (call, x.device, x.dtype, x.shape[1], call.variant.key_dims(t), m_bucket(x.shape[0]), has_bias)
    found = _states.get(parts)
    if found is None:
        key = key_of(call, t, has_bias)
        found = _states[parts] = (key, path_state.entry(key))
    return found


def describe(t: Operands, call: Call) -> dict:
    """Shapes and dtypes for the self-check's warning and report line."""
    weight_shape = list(t.weight.shape) if t.weight is not None else list(t.base.layer.weight.shape)
    return {"shapes": {"x": list(t.x.shape), "weight": weight_shape, **call.variant.adapter_shapes(t)},
            "dtypes": {"x": str(t.x.dtype).removeprefix("torch."),
                       "adapters": str(call.variant.key_dims(t)[0]).removeprefix("torch.")},
            "variant": call.variant.name, "base": call.kind.name}


# ------------------------------------------------------------------------------------------------------ helpers


def _no_autocast(fn, device_type: str, *args, **kwargs):
    """``fn(...)`` with autocast off: the Function has already chosen the dtypes, and the fp32 rank-r GEMMs of fp32
    adapters must not be re-cast to half by autocast."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def _pass(call: Call, path: str):
    return call.kind.passes[(call.variant.name, path)]


def _order(path: str) -> int:
    return ("fused", "composed", "torch").index(path)


def _steady_path(call: Call, key: str, st: path_state.KeyState) -> str | None:
    """The path this key runs now, or None while ``auto`` has not chosen one."""
    path = call.path
    if path == "auto":
        path = path_choice.kept(key, st)
        if path not in call.candidates:
            return None
    if st.demoted is not None and _order(st.demoted) > _order(path):
        return st.demoted
    return path


def _settle(call: Call, key: str, st: path_state.KeyState, check: str, asked: str, t: Operands,
            device: torch.device) -> None:
    """After a first call: when the key's calls of this check (asking for path ``asked``) need nothing more than their
    pass (the path they run now is warm, no check is due or owed), the steady state's entry. Call under the lock."""
    current = _current(call, key, st, asked)
    if current is not None and _settled(call, st, current, check, t, device) and (current, check) not in st.owed and \
            path_state.verify_mode(device) != "always":
        st.steady[(asked, check)] = current


def _current(call: Call, key: str, st: path_state.KeyState, asked: str) -> str | None:
    """The path a call asking for ``asked`` runs now: auto's choice, moved on by failed checks and kernel failures."""
    if asked == "auto":
        return _steady_path(call, key, st)
    if st.demoted is not None and _order(st.demoted) > _order(asked):
        return st.demoted
    return asked


def _settled(call: Call, st: path_state.KeyState, path: str, check: str, t: Operands, device: torch.device) -> bool:
    """Whether a call can take the steady state: its path has run this direction before (tuned, compiled) and no
    check is due."""
    return (path, check) in st.warm and not _check_due(call, st, path, check, t, device)


def _check_due(call: Call, st: path_state.KeyState, path: str, check: str, t: Operands, device: torch.device) -> bool:
    if path == "torch":  # the PyTorch path is the reference itself
        return False
    mode = path_state.verify_mode(device)
    if mode == "off":
        return False
    if mode == "always" or (path, check) not in st.passed:
        return True
    owed = st.owed.get((path, check))
    return owed is not None and owed != call.variant.state(t)


def _refuse_capture(key: str) -> None:
    """A key's first call synchronises (timing, autotuning, the check's comparisons): illegal during CUDA graph
    capture."""
    if capturing():
        raise RuntimeError(
            f"fused_lora: {key} is met for the first time while a CUDA graph is being captured; its first call times, "
            "autotunes and checks the kernels, which synchronises the GPU (illegal during capture). Warm this shape "
            "up before capturing: run the model's forward and backward once on inputs of the captured shapes (as "
            "torch.cuda.graphs' own warm-up iterations do), then capture")


def _kernels_keep(call: Call, t: Operands, seed):
    return call.variant.kernels_keep(call, t, seed)


def _note_failure(st: path_state.KeyState, call: Call, path: str, direction: str, err: BaseException,
                  device: torch.device) -> str:
    nxt = self_check.next_path(path, call.candidates)
    with path_state.LOCK:
        st.failures.append({"path": path, "direction": direction, "error": first_line(err)})
        if st.demoted is None or _order(nxt) > _order(st.demoted):
            st.demoted = nxt
        st.steady.clear()
    warn_fallback(f"a Triton kernel of the {path} path's {direction} failed on {device_name(device)} "
                  f"({first_line(err)}); this call and later ones with the same shapes and dtypes run the {nxt} path")
    return nxt


# ------------------------------------------------------------------------------------------------------ forward


def run_forward(call: Call, t: Operands, seed, kwargs: dict) -> tuple[tuple, str]:
    """(the forward's outputs: y, then what backward reads; the path that ran)."""
    device = t.x.device
    if call.backend == "torch":
        return _no_autocast(_pass(call, "torch").forward, device.type, t, call, seed, None, **kwargs), "torch"
    key, st = state_of(call, t, t.bias is not None)
    steady = st.steady.get((call.path, "forward"))
    with on_device(device):  # once per call: Triton launches go to the *current* device
        if steady is not None:  # the steady state: the pass, nothing else
            outs, path = _forward_on(call, t, seed, steady, kwargs, st)
        else:  # a first call (tuning, first launches, a check): one thread at a time, never during capture
            with path_state.LOCK:
                path = _steady_path(call, key, st)
                if path is None or not _settled(call, st, path, "forward", t, device):
                    _refuse_capture(key)
                if path is None:
                    path = _choose(call, t, seed, kwargs, key, st)
                outs, path = _checked_forward(call, t, seed, path, kwargs, key, st)
                st.warm.add((path, "forward"))
                _settle(call, key, st, "forward", call.path, t, device)
    st.runs = path
    if outs[1].dtype != torch.float32:  # S in fp32 whichever path ran: the backward may run on another
        outs = (outs[0], outs[1].float(), *outs[2:])
    return outs, path


def _forward_on(call, t, seed, path, kwargs, st, base=None) -> tuple[tuple, str]:
    """The pass of ``path`` (the next path when its kernels cannot run here)."""
    device = t.x.device
    while True:
        keep = _kernels_keep(call, t, seed) if path == "torch" else None
        run_t = t if base is None or path == "torch" else t._replace(base=base)
        try:
            return _no_autocast(_pass(call, path).forward, device.type, run_t, call, seed, keep, **kwargs), path
        except KERNEL_FAILURES as err:
            path = _note_failure(st, call, path, "forward", err, device)


def _choose(call, t, seed, kwargs, key, st) -> str:
    """``auto``: times each candidate's forward and backward on this call's inputs (``path_choice``)."""
    needs = call.variant.timing_needs(t)

    def candidate(path):
        def run():
            keep = _kernels_keep(call, t, seed) if path == "torch" else None
            outs = _no_autocast(_pass(call, path).forward, t.x.device.type, t, call, seed, keep, **kwargs)
            dy = dys.setdefault("dy", torch.randn_like(outs[0]))
            keep = _kernels_keep(call, t, seed) if path == "torch" else None  # made again, as a real backward does
            _no_autocast(_pass(call, path).backward, t.x.device.type, t, call, tuple(outs[1:]), dy, needs, seed, keep)
        return run

    dys: dict = {}
    return path_choice.choose(key, st, t.x.device, {p: candidate(p) for p in call.candidates})


def _checked_forward(call, t, seed, path, kwargs, key, st) -> tuple[tuple, str]:
    device = t.x.device
    if not _check_due(call, st, path, "forward", t, device):
        return _forward_on(call, t, seed, path, kwargs, st)
    blocks = row_blocks(t.x.shape[0])
    seen: dict = {}
    recording = None
    if path == "composed":  # the base's output is the layer's own: recorded, replayed to the references
        recording = Recording(t.base if t.base is not None else _dense_base(t, call), blocks, seen)
    outs, ran = _forward_on(call, t, seed, path, kwargs, st, base=recording)
    if ran != path:  # its kernels could not run: the next path ran instead, checked on a later call
        return outs, ran
    own = call.variant.own_check
    try:
        if own is not None:
            verdict = _no_autocast(own.compare_forward, device.type, call, t, seed, path, outs, blocks, seen)
        else:
            verdict = _compare_forward(call, t, seed, path, kwargs, outs, blocks, seen)
    except torch.OutOfMemoryError as err:
        self_check.skipped(st, path, "forward", f"out of memory: {str(err).splitlines()[0][:120]}")
        return outs, path
    moved = self_check.record(st, key, path, "forward", device, verdict, describe(t, call), call.candidates)
    if moved is None:
        _passed(st, call, path, "forward", t, outs)
        return outs, path
    del outs  # the faulty results: the PyTorch path's replace them
    return _forward_on(call, t, seed, "torch", kwargs, st)[0], "torch"


def _passed(st: path_state.KeyState, call: Call, path: str, check: str, t: Operands, outs: tuple) -> None:
    """A passed check; when it could not see every kernel term (B = 0, DoRA's g = 1) it is owed again once B (or the
    magnitude) has changed."""
    st.passed.add((path, check))
    if call.variant.blind(t, outs):
        st.owed[(path, check)] = call.variant.state(t)
    else:
        st.owed.pop((path, check), None)


def _dense_base(t: Operands, call: Call) -> DenseBase:
    """A dense call's weight as a base object (the composed path's base)."""
    return DenseBase(t.weight, t.bias, call.layout)


def _reference_bases(call: Call, t: Operands, path: str, seen: dict, direction: str):
    """(the base for the same-dtype reference, the base for the fp64 one) of a check of ``path``: a composed path's base
    output is the layer's own and is replayed (only the rank-r term is checked); a fused path computes the base GEMM
    itself and is checked against the dense fp64 GEMM of the (dequantized) weight."""
    name = "forward" if direction == "forward" else "input_grad"
    if path == "composed":
        rows = seen[name]
        fwd, grad = (rows, None) if direction == "forward" else (None, rows)
        return Replay(fwd, grad), Replay(fwd, grad, torch.float64)
    if t.base is None:  # dense fused: the same-dtype reference is the dense PyTorch pass itself
        return None, Dense64(t.weight, t.bias, call.layout)
    weight = t.base.dequantized()
    bias = t.bias
    return t.base, Dense64(weight, bias, "linear")


def _reference_operands(call: Call, t: Operands, rows_x: torch.Tensor, base, fp64: bool) -> Operands:
    up = (lambda v: None if v is None else v.double()) if fp64 else (lambda v: v)
    weight = t.weight
    if call.variant.name == "dora":  # DoRA's PyTorch pass reads W itself (norm, base GEMM)
        weight = up(weight)
    elif fp64 or base is not None:
        weight = None  # the base object computes the base part
    return Operands(up(rows_x), weight, up(t.bias), up(t.lora_A), up(t.lora_B), up(t.magnitude), base)


def _reference_pass(call: Call, t: Operands):
    """The PyTorch pass a reference runs: the kind's own, or LoRA's composed PyTorch pass when the base part is given
    as a base object (a replayed output, the dense fp64 GEMM)."""
    if t.base is not None and call.variant.name == "lora":
        return lora_torch.COMPOSED
    return _pass(call, "torch")


def _compare_forward(call, t, seed, path, kwargs, outs, blocks, seen):
    variant = call.variant
    M, K = t.x.shape
    keep = _rows_keep(call, seed, blocks, K, t.x.device)
    x_rows = take_rows(t.x, blocks)
    same_base, ref_base = _reference_bases(call, t, path, seen, "forward")
    got = {}
    for name, out in zip(variant.output_names, outs, strict=True):
        if name == "P" and out.numel() == 0:
            continue
        got[name] = take_rows(out, blocks) if name in variant.row_outputs else out
    results = {}
    with torch.no_grad():
        for label, base, fp64 in (("same", same_base, False), ("ref", ref_base, True)):
            rt = _reference_operands(call, t, x_rows, base, fp64)
            r = _no_autocast(_reference_pass(call, rt).forward, t.x.device.type, rt, call, seed, keep, **kwargs)
            results[label] = {n: v for n, v in zip(variant.output_names, r, strict=True) if n in got}
    return self_check.compare(got, results["same"], results["ref"])


def _rows_keep(call, seed, blocks, K, device) -> torch.Tensor | None:
    """The kernels' keep mask on the sampled rows (each block generated at its own rows: the mask is a function of
    (seed, row, column))."""
    if call.p == 0:
        return None
    parts = [masks.keep_rows("triton", seed, b.start, b.stop - b.start, K, call.p, device) for b in blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ------------------------------------------------------------------------------------------------------ backward


def run_backward(call: Call, t: Operands, saved: tuple, dy: torch.Tensor, needs: tuple[bool, ...], seed,
                 path: str, has_bias: bool) -> tuple:
    """The gradients (dX, dA, dB, dbias[, d magnitude]), None where not needed, each in its input's dtype (dbias fp32),
    on the forward's path (or the later one a failed check or a kernel failure moved the key to)."""
    device = dy.device
    cast = call.variant.cast_grads
    if call.backend == "torch":
        grads = _no_autocast(_pass(call, "torch").backward, device.type, t, call, saved, dy, needs, seed, None)
        return cast(grads, t)
    key, st = state_of(call, t, has_bias)  # the forward's key (LoRA does not save the bias: its presence)
    check = _CHECKS.get(needs) or _check_name(call, needs)
    steady = st.steady.get((path, check))
    with on_device(device):
        if steady is not None:
            return cast(_backward_on(call, t, saved, dy, needs, seed, steady, st)[0], t)
        with path_state.LOCK:
            asked = path
            path = _current(call, key, st, asked) or "torch"  # auto (torch.compile): the key's choice
            if not _settled(call, st, path, check, t, device):
                _refuse_capture(key)
            grads, ran = _checked_backward(call, t, saved, dy, needs, seed, path, key, st, check)
            st.warm.add((ran, check))
            _settle(call, key, st, check, asked, t, device)
            return cast(grads, t)


_CHECKS: dict[tuple, str] = {}


def _check_name(call: Call, needs: tuple[bool, ...]) -> str:
    """"backward:dx,dA,dB" for the gradients a backward computes (a check of its own per set)."""
    name = _CHECKS[needs] = "backward:" + ",".join(
        n for n, need in zip(call.variant.grad_names, needs, strict=False) if need)
    return name


def _backward_on(call, t, saved, dy, needs, seed, path, st, base=None) -> tuple[tuple, str]:
    device = dy.device
    while True:
        keep = _kernels_keep(call, t, seed) if path == "torch" else None
        run_t = t if base is None or path == "torch" else t._replace(base=base)
        try:
            return _no_autocast(_pass(call, path).backward, device.type, run_t, call, saved, dy, needs, seed,
                                keep), path
        except KERNEL_FAILURES as err:
            path = _note_failure(st, call, path, "backward", err, device)


def _checked_backward(call, t, saved, dy, needs, seed, path, key, st, check) -> tuple[tuple, str]:
    device = dy.device
    if not _check_due(call, st, path, check, t, device):
        return _backward_on(call, t, saved, dy, needs, seed, path, st)
    blocks = row_blocks(t.x.shape[0])
    seen: dict = {}
    recording = None
    if path == "composed" and needs[0]:
        recording = Recording(t.base if t.base is not None else _dense_base(t, call), blocks, seen)
    grads, ran = _backward_on(call, t, saved, dy, needs, seed, path, st, base=recording)
    if ran != path:  # its kernels could not run: the next path ran instead, checked on a later call
        return grads, ran
    own = call.variant.own_check
    try:
        if own is not None:
            verdict = _no_autocast(own.compare_backward, device.type, call, t, saved, dy, needs, seed, path, grads,
                                   blocks, seen)
        else:
            verdict = _compare_backward(call, t, saved, dy, needs, seed, path, grads, blocks, seen)
    except torch.OutOfMemoryError as err:
        self_check.skipped(st, path, check, f"out of memory: {str(err).splitlines()[0][:120]}")
        return grads, path
    moved = self_check.record(st, key, path, check, device, verdict, describe(t, call), call.candidates)
    if moved is None:
        _passed(st, call, path, check, t, (None, *saved))
        return grads, path
    del grads
    return _backward_on(call, t, saved, dy, needs, seed, "torch", st)[0], "torch"


def _compare_backward(call, t, saved, dy, needs, seed, path, grads, blocks, seen):
    """dX on the sampled rows; the reductions over M (dA, dB, dbias, d magnitude) in full, over chunks of rows."""
    variant = call.variant
    M, K = t.x.shape
    N = dy.shape[1]
    got = {n: g for n, g in zip(variant.grad_names, grads, strict=True) if g is not None}
    if "dx" in got:
        got["dx"] = take_rows(got["dx"], blocks)
    same_base, ref_base = _reference_bases(call, t, path, seen, "backward") if needs[0] else (None, None)
    totals: dict[str, dict] = {"same": {}, "ref": {}}
    with torch.no_grad():
        # dX on the sampled rows (the rows' own reductions are not kept: the chunks below cover every row)
        if needs[0]:
            only_dx = (True,) + (False,) * (len(needs) - 1)
            keep = _rows_keep(call, seed, blocks, K, t.x.device)
            for label, base, fp64 in (("same", same_base, False), ("ref", ref_base, True)):
                rt = _reference_operands(call, t, take_rows(t.x, blocks), base, fp64)
                saved_rows = variant.recomputed(rt, call, keep, tuple(take_rows(s, blocks) if s.dim() == 2 and
                                                                       s.shape[0] == M else s for s in saved), fp64)
                dy_rows = take_rows(dy, blocks)
                g = _no_autocast(_reference_pass(call, rt).backward, t.x.device.type, rt, call, saved_rows,
                                 dy_rows.double() if fp64 else dy_rows, only_dx, seed, keep)
                totals[label]["dx"] = g[0]
        reductions = (False,) + tuple(needs[1:])
        if any(reductions):
            for chunk in row_chunks(M, max(K, N)):
                keep = None if call.p == 0 else masks.keep_rows("triton", seed, chunk.start, chunk.stop - chunk.start,
                                                                K, call.p, t.x.device)
                for label, fp64 in (("same", False), ("ref", True)):
                    rt = _reference_operands(call, t, t.x[chunk], None, fp64)
                    saved_c = variant.recomputed(rt, call, keep, tuple(s[chunk] if s.dim() == 2 and s.shape[0] == M
                                                                       else s for s in saved), fp64)
                    dy_c = dy[chunk].double() if fp64 else dy[chunk]
                    g = _no_autocast(_pass(call, "torch").backward, t.x.device.type, rt, call, saved_c, dy_c,
                                     reductions, seed, keep)
                    for name, value in zip(variant.grad_names, g, strict=True):
                        if value is None or name == "dx":
                            continue
                        acc = totals[label]
                        acc[name] = value.double() if name not in acc else acc[name] + value.double()
    return self_check.compare(got, totals["same"], totals["ref"])


# ----------------------------------------------------------------------------------------- torch.compile's ops


def _call_of(variant: str, kind: str, layout: str, scaling: float, p: float, backend: str, path: str,
             candidates: str, scalings: list[float], ps: list[float]) -> Call:
    """The call record from the values the custom ops carry (plain values, not objects: a compiled graph holds them
    as constants, and the record is found again by value, in any process; a schema has no list of strings, so the
    candidates travel comma-joined)."""
    return call_record(variant, bases.get(kind), layout, scaling, p, backend, path, tuple(candidates.split(",")),
                       tuple(scalings), tuple(ps))


def _op_args(call: Call) -> tuple:
    return (call.variant.name, call.kind.name, call.layout, call.scaling, call.p, call.backend, call.path,
            ",".join(call.candidates), list(call.scalings), list(call.ps))


# A variant's own inputs (``extra``) travel as three lists: its tensors, its optional tensors, its ints (the multi
# variant: every A_i then every B_i, the own biases, the segment lengths); empty for LoRA and DoRA.
@torch.library.custom_op("fused_lora::forward", mutates_args=())
def _forward_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor | None,
                lora_B: torch.Tensor | None, magnitude: torch.Tensor | None, seed: torch.Tensor | None,
                extra_tensors: list[torch.Tensor], extra_optional: list[torch.Tensor | None], extra_ints: list[int],
                variant: str, kind: str, layout: str, scaling: float, p: float, backend: str, path: str,
                candidates: str, scalings: list[float], ps: list[float], base: int,
                need_p: bool) -> list[torch.Tensor]:
    rec = _call_of(variant, kind, layout, scaling, p, backend, path, candidates, scalings, ps)
    extra = rec.variant.from_op_extras(extra_tensors, extra_optional, extra_ints)
    t = rec.variant.operands(rec, x, weight, bias, lora_A, lora_B, magnitude, bases.by_handle(base), extra)
    kwargs = {"need_p": need_p} if rec.variant.name == "dora" else {}
    return list(run_forward(rec, t, rec.variant.host_seed(seed) if rec.backend == "torch" else seed, kwargs)[0])


@_forward_op.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, seed, extra_tensors, extra_optional, extra_ints, variant, kind,
      layout, scaling, p, backend, path, candidates, scalings, ps, base, need_p):
    rec = _call_of(variant, kind, layout, scaling, p, backend, path, candidates, scalings, ps)
    extra = rec.variant.from_op_extras(extra_tensors, extra_optional, extra_ints)
    t = rec.variant.operands(rec, x, weight, bias, lora_A, lora_B, magnitude, None, extra)
    return list(rec.variant.fake_outputs(t, rec, {"need_p": need_p}))


@torch.library.custom_op("fused_lora::backward", mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, magnitude: torch.Tensor | None,
                 seed: torch.Tensor | None, saved: list[torch.Tensor], extra_tensors: list[torch.Tensor],
                 extra_optional: list[torch.Tensor | None], extra_ints: list[int], variant: str, kind: str,
                 layout: str, scaling: float, p: float, backend: str, path: str, candidates: str,
                 scalings: list[float], ps: list[float], base: int, needs: list[bool],
                 has_bias: bool) -> list[torch.Tensor]:
    """The gradients, flat (``Variant.flat_grads``); an empty tensor for each one not needed (a custom op cannot return
    None)."""
    rec = _call_of(variant, kind, layout, scaling, p, backend, path, candidates, scalings, ps)
    extra = rec.variant.from_op_extras(extra_tensors, extra_optional, extra_ints)
    t = rec.variant.operands(rec, x, weight, bias, lora_A, lora_B, magnitude, bases.by_handle(base), extra)
    grads = run_backward(rec, t, tuple(saved), dy, tuple(needs),
                         rec.variant.host_seed(seed) if rec.backend == "torch" else seed, rec.path, has_bias)
    return rec.variant.flat_grads(grads, dy)


@_backward_op.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, magnitude, seed, saved, extra_tensors, extra_optional, extra_ints, variant,
      kind, layout, scaling, p, backend, path, candidates, scalings, ps, base, needs, has_bias):
    rec = _call_of(variant, kind, layout, scaling, p, backend, path, candidates, scalings, ps)
    extra = rec.variant.from_op_extras(extra_tensors, extra_optional, extra_ints)
    t = rec.variant.operands(rec, x, weight, bias, lora_A, lora_B, magnitude, None, extra)
    return rec.variant.fake_grads(dy, t, tuple(needs))


# ----------------------------------------------------------------------------------------------- the Function


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


class FusedLoRAFunction(torch.autograd.Function):
    """The autograd Function of every fused layer (LoRA, DoRA, several adapters; dense or quantized base). Use the
    router's entry points (``fused_lora.fused_lora_linear``, ``dispatch.multi_call``, the modules), which check the
    inputs, route the call and draw the seed, rather than ``apply``. ``base``: a quantized layer's base object
    (``bases.base_of``), None for a dense weight; ``extra``: a variant's own inputs (``autograd/variants.py``)."""

    @staticmethod
    def forward(ctx, call: Call, x, weight, bias, lora_A, lora_B, magnitude, seed, base, *extra):
        variant = call.variant
        kwargs = variant.forward_kwargs(ctx.needs_input_grad)
        t = variant.operands(call, _as_2d(x), weight, bias, lora_A, lora_B, magnitude, base, extra)
        if torch.compiler.is_compiling():
            outs = tuple(_forward_op(t.x, weight, bias, lora_A, lora_B, magnitude, seed, *variant.op_extras(extra),
                                     *_op_args(call), base_handle(base), kwargs.get("need_p", False)))
            path = call.path
            ctx.seed_arg = seed
        else:  # the PyTorch backend's seed read on the host once, for backward too
            ctx.seed_arg = variant.host_seed(seed) if call.backend == "torch" else seed
            outs, path = run_forward(call, t, ctx.seed_arg, kwargs)
        # x itself, not its 2-D view: an input of the Function stays connected to the graph when a backward with
        # create_graph=True reads it back (a view made in here would not be).
        # the bias itself only where the differentiable backward recomputes y with it (DoRA); LoRA's needs its dtype
        # a variant's own tensors are saved (its other inputs, e.g. the Segments, are kept as they are)
        extra_tensors = [e for e in extra if isinstance(e, torch.Tensor)]
        ctx.save_for_backward(x, weight, bias if variant.saves_bias else None, lora_A, lora_B, magnitude, seed,
                              *extra_tensors, *outs[1:])
        ctx.extra = tuple(None if isinstance(e, torch.Tensor) else e for e in extra)
        ctx.extra_is_tensor = tuple(isinstance(e, torch.Tensor) for e in extra)
        ctx.call, ctx.base, ctx.path = call, base, path
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = outs[0]
        # _unsafe_view, as torch.matmul does for N-D inputs: not an autograd view of the 2-D result, so wrappers that
        # hook module outputs (FSDP2 warns on views) and in-place ops on y work.
        return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, lora_A, lora_B, magnitude, seed, *rest = ctx.saved_tensors
        tensors = iter(rest)
        extra = tuple(next(tensors) if is_tensor else e for e, is_tensor in zip(ctx.extra, ctx.extra_is_tensor,
                                                                                 strict=True))
        saved = list(tensors)
        call = ctx.call
        variant = call.variant
        needs = variant.needs(ctx.needs_input_grad)
        if torch.is_grad_enabled():  # backward(create_graph=True): a backward that is itself differentiable
            grads = variant.graph_backward(call, ctx.base, dy, x, weight, bias, ctx.bias_dtype, lora_A, lora_B,
                                           magnitude, seed, ctx.seed_arg, extra, needs)
        else:
            t = variant.operands(call, _as_2d(x), weight, bias, lora_A, lora_B, magnitude, ctx.base, extra)
            if torch.compiler.is_compiling():
                flat = _backward_op(_as_2d(dy), t.x, weight, bias, lora_A, lora_B, magnitude, seed, saved,
                                    *variant.op_extras(extra), *_op_args(call), base_handle(ctx.base), list(needs),
                                    ctx.bias_dtype is not None)
                grads = variant.nested_grads(flat, needs, extra)
            else:
                grads = run_backward(call, t, tuple(saved), _as_2d(dy), needs, ctx.seed_arg, ctx.path,
                                     ctx.bias_dtype is not None)
        return variant.function_grads(grads, x, ctx.bias_dtype, extra)
