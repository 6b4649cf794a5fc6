"""Several named LoRA adapters in one model, trained and served together: every adapted layer computes all of them in
one fused call (``multi_layer.MultiLoRALinear``), each adapter exactly as if it were trained alone.

    model = inject_adapters(model, {"r4": LoRAConfig(r=4, lora_alpha=8), "r16": LoRAConfig(r=16, lora_alpha=32)})
    optimizer = torch.optim.AdamW(adapter_param_groups(model, {"r4": {"lr": 1e-3}, "r16": {"lr": 3e-4}}))
    collate = AdapterCollator(my_collate)          # groups each batch's examples by adapter, adds "adapter_names"
    loss = model(**collate(examples)).loss        # adapter_names=[one per example] (PEFT's word), taken off the call
    with use_adapters(model, ["r4", "r16", …]):    # or: a context, for code that calls the model itself
        ...
    save_adapters(model, "out")                   # out/r4/, out/r16/: PEFT adapter folders, by name
    load_adapters(model, {"r4": "out/r4"})        # PeftModel.from_pretrained(base, "out/r4") loads each one alone

Each adapter takes PEFT's config words (a :class:`~fused_lora.LoRAConfig` per name: target_modules, r, lora_alpha,
lora_dropout, use_rslora, init_lora_weights, rank_pattern, alpha_pattern, bias="lora_only" as a bias of its own).
Adapters may target different modules: a layer gets the adapters that target it, and the examples of the others see
its base output there (PEFT's rule). Not supported with several adapters (refused with a message): DoRA, bias="all",
modules_to_save (a full copy of a module per adapter), merging.

Which examples belong to which adapter is said per batch, one name per example (dim 0 of the inputs; ``"__base__"``
for the base model's output), as PEFT's ``adapter_names=``; a batch whose examples are grouped by adapter in the
model's adapter order runs without a copy, any other order is grouped per layer and put back. Without names, every
example goes to the active adapter (:func:`set_active_adapter`; the first by default). The names set by a forward
stay until the next forward: a backward that recomputes activations (gradient checkpointing) must come before the
next forward.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import bases
from .adapters import PEFT_PREFIX, read_adapter_folder, write_adapter_folder
from .config import LoRAConfig
from .injector import check_not_injected, plan_injection
from .multi_layer import BASE_ROWS, AdapterSettings, MultiLoRALinear, Rows

STATE_ATTR = "_fused_lora_multi_state"

__all__ = ["AdapterCollator", "adapter_param_groups", "get_multi_state", "group_by_adapter", "inject_adapters",
           "load_adapters", "multi_layers", "save_adapters", "set_active_adapter", "unload_adapters", "use_adapters"]


@dataclass
class MultiState:
    """Kept on the model (``model._fused_lora_multi_state``): each adapter's config (target_modules resolved) and
    targets, the replaced modules, the rows shared by the layers, the forward hook."""

    configs: dict[str, LoRAConfig]
    targets: dict[str, list[str]]
    originals: dict[str, nn.Module]
    rows: Rows
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    hook: object = None
    context: list = field(default_factory=list)  # the names of the use_adapters blocks entered, innermost last


def get_multi_state(model: nn.Module) -> MultiState | None:
    return model.__dict__.get(STATE_ATTR)


def multi_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The model's multi-adapter layers by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def _require(model: nn.Module, what: str) -> MultiState:
    state = get_multi_state(model)
    if state is None:
        raise ValueError(f"{what}: {type(model).__name__} has no adapters of inject_adapters; call inject_adapters("
                         "model, {name: LoRAConfig(...)}) or load_adapters(model, {name: folder}) first")
    return state


def _check_config(name: str, config: LoRAConfig, plan) -> None:
    where = f"inject_adapters: adapter {name!r}"
    if config.use_dora:
        raise TypeError(f"{where}: use_dora=True; several adapters on one base run plain LoRA (DoRA: one adapter per "
                        "model, inject_lora)")
    if config.bias == "all":
        raise ValueError(f"{where}: bias='all' would train the model's shared biases for every adapter; use "
                         "bias='lora_only' (a bias of its own per adapter on its layers) or 'none'")
    if plan.modules_to_save:
        raise ValueError(f"{where}: modules_to_save {plan.modules_to_save} would need a full copy of those modules per "
                         "adapter; train them with one adapter per model (inject_lora), or leave them out")


def _pre_forward(state: MultiState):
    """Takes ``adapter_names=`` off a call of the model (the model's forward does not know it) and sets the rows."""

    def hook(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is None and state.context:
            names = state.context[-1]
        if names is not None and not isinstance(names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of adapter names, one per example, got "
                            f"{type(names).__name__}")
        if names is not None:
            unknown = sorted({n for n in names if n != BASE_ROWS} - set(state.configs))
            if unknown:
                raise ValueError(f"adapter_names: no adapter named {unknown} (adapters: {list(state.configs)}; "
                                 f"{BASE_ROWS!r}: the base model's output)")
        state.rows.set(names)
        return args, kwargs

    return hook


def inject_adapters(model: nn.Module, configs: dict[str, LoRAConfig], *, seeds: dict[str, int] | None = None,
                    adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Puts several named adapters into ``model`` (in place; returns it): each targeted layer becomes a
    ``MultiLoRALinear`` holding the adapters that target it (GPT-2 ``Conv1D``, ``nn.Linear`` of Gemma, Llama, OPT …,
    bitsandbytes 4/8-bit layers), everything else is frozen, each adapter's A and B (and its own bias with
    ``bias="lora_only"``) are trainable. ``seeds``: adapter name → seed; adapter ``name`` is then initialised exactly as
    ``inject_lora(model, configs[name])`` right after ``torch.manual_seed(seeds[name])`` (A drawn layer after layer),
    so a sweep run one adapter at a time starts from the same weights. Everything is checked before the model
    changes."""
    if not configs:
        raise ValueError("inject_adapters: give at least one adapter: {name: LoRAConfig(...)}")
    if get_multi_state(model) is not None or multi_layers(model):
        raise ValueError("inject_adapters: the model already holds several adapters; unload_adapters(model) first")
    check_not_injected(model)
    plans = {}
    for name, config in configs.items():
        if not isinstance(name, str) or not name or "." in name or name == BASE_ROWS:
            raise ValueError(f"inject_adapters: adapter name {name!r} must be a non-empty string without '.', and not "
                             f"{BASE_ROWS!r}")
        plans[name] = plan_injection(model, config)
        _check_config(name, config, plans[name])
    if seeds is not None and set(seeds) != set(configs):
        raise ValueError(f"inject_adapters: seeds for {sorted(seeds)} but adapters {sorted(configs)}; give one per "
                         "adapter or none")
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    paths = sorted({p for plan in plans.values() for p in plan.targets}, key=order.__getitem__)
    state = MultiState({n: p.config for n, p in plans.items()}, {n: list(p.targets) for n, p in plans.items()}, {},
                       Rows(active=next(iter(configs))))
    state.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in state.requires_grad:
            p.requires_grad_(False)
        for path in paths:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            settings = {}
            for name, plan in plans.items():
                if path not in plan.targets:
                    continue
                config = plan.config
                settings[name] = AdapterSettings(
                    r=config.rank_for(path), lora_alpha=config.alpha_for(path), lora_dropout=config.lora_dropout,
                    use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                    own_bias=config.bias == "lora_only" and getattr(original, "bias", None) is not None)
            layer = MultiLoRALinear(original, settings, adapter_dtype=adapter_dtype, rows=state.rows, init=False)
            layer.train(original.training)
            setattr(parent, child, layer)
            state.originals[path] = original
        for name in configs:  # adapter after adapter, layer after layer: inject_lora's draws for each
            if seeds is not None:
                torch.manual_seed(seeds[name])
            for path in state.targets[name]:
                layer = model.get_submodule(path)
                layer.reset_adapter(name)
                layer.lora_A[name].requires_grad_(True)
                layer.lora_B[name].requires_grad_(True)
                if name in layer.lora_bias:
                    layer.lora_bias[name].requires_grad_(True)
    except BaseException:
        for path, original in state.originals.items():
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, original)
        for p, flag in state.requires_grad:
            p.requires_grad_(flag)
        raise
    state.hook = model.register_forward_pre_hook(_pre_forward(state), with_kwargs=True)
    model.__dict__[STATE_ATTR] = state
    bases.prepare_all(model)
    return model


def unload_adapters(model: nn.Module) -> nn.Module:
    """Takes the adapters out again: the original modules back, requires_grad flags as before injection."""
    state = _require(model, "unload_adapters")
    for path, original in state.originals.items():
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, original)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    state.hook.remove()
    del model.__dict__[STATE_ATTR]
    return model


def set_active_adapter(model: nn.Module, name: str) -> None:
    """The adapter every example goes to when no names are given (PEFT's ``set_adapter`` for one adapter)."""
    state = _require(model, "set_active_adapter")
    if name not in state.configs:
        raise ValueError(f"set_active_adapter: no adapter {name!r} (adapters: {list(state.configs)})")
    state.rows.active = name
    state.rows.plans.clear()


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the block, the model's examples go to ``names`` (one per example along dim 0 of the inputs; as
    ``adapter_names=``), for calls of the model or of any of its parts."""
    state = _require(model, "use_adapters")
    names = tuple(names)
    unknown = sorted({n for n in names if n != BASE_ROWS} - set(state.configs))
    if unknown:
        raise ValueError(f"use_adapters: no adapter named {unknown} (adapters: {list(state.configs)})")
    state.context.append(names)
    previous = state.rows.names
    state.rows.set(names)
    try:
        yield model
    finally:
        state.context.pop()
        state.rows.set(state.context[-1] if state.context else previous)


def group_by_adapter(examples: Sequence, adapters: Sequence[str] | None = None, key: str = "adapter"
                     ) -> tuple[list, list[str]]:
    """(the examples grouped by adapter, each one's adapter name): stable, in ``adapters``' order (a model's:
    ``list(get_multi_state(model).configs)``; default: first appearance), ``"__base__"`` last. An example is a dict
    holding ``key``, or a pair (example, name)."""
    pairs = [(e, e[key]) if isinstance(e, dict) else (e[0], e[1]) for e in examples]
    order = {n: i for i, n in enumerate(adapters)} if adapters is not None else {}
    for _, name in pairs:
        if name != BASE_ROWS and name not in order:
            if adapters is not None:
                raise ValueError(f"group_by_adapter: an example names adapter {name!r}, not one of {list(adapters)}")
            order[name] = len(order)
    rank = [(order.get(name, len(order)), i) for i, (_, name) in enumerate(pairs)]
    grouped = [pairs[i] for _, i in sorted(rank)]
    strip = (lambda e: {k: v for k, v in e.items() if k != key}) if pairs and isinstance(examples[0], dict) else \
        (lambda e: e)  # noqa: E731
    return [strip(e) for e, _ in grouped], [name for _, name in grouped]


class AdapterCollator:
    """A collator that groups each batch's examples by adapter (:func:`group_by_adapter`), collates them with
    ``collate`` (e.g. transformers' ``DataCollatorWithPadding``) and adds ``batch["adapter_names"]``: the model called
    with ``**batch`` runs each adapter's rows in one fused call without a copy. (With transformers' Trainer, keep the
    examples' ``adapter`` column: ``remove_unused_columns=False``.)"""

    def __init__(self, collate: Callable[[list], dict], adapters: Sequence[str] | None = None, key: str = "adapter"):
        self.collate, self.adapters, self.key = collate, adapters, key

    def __call__(self, examples: list) -> dict:
        grouped, names = group_by_adapter(examples, self.adapters, self.key)
        batch = self.collate(grouped)
        batch["adapter_names"] = names
        return batch


def adapter_param_groups(model: nn.Module, options: dict[str, dict] | None = None) -> list[dict]:
    """One optimizer param group per adapter (its A, B and own bias on every layer), with ``options[name]`` (e.g.
    ``{"lr": 1e-3, "weight_decay": 0.0}``) and ``"name"``: a learning-rate sweep in one optimizer."""
    state = _require(model, "adapter_param_groups")
    options = options or {}
    unknown = sorted(set(options) - set(state.configs))
    if unknown:
        raise ValueError(f"adapter_param_groups: options for {unknown}, which are not adapters ({list(state.configs)})")
    groups = []
    for name in state.configs:
        params = []
        for path in state.targets[name]:
            layer = model.get_submodule(path)
            params += [layer.lora_A[name], layer.lora_B[name]]
            if name in layer.lora_bias:
                params.append(layer.lora_bias[name])
        groups.append({"params": params, "name": name, **options.get(name, {})})
    return groups


def _file_tensors(model: nn.Module, state: MultiState, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors by PEFT's file key (as ``save_adapter`` writes one adapter)."""
    out = {}
    for path in state.targets[name]:
        layer = model.get_submodule(path)
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name]
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name]
        if name in layer.lora_bias:
            out[f"{PEFT_PREFIX}{path}.base_layer.bias"] = layer.lora_bias[name]
    return out


def save_adapters(model: nn.Module, directory: str | os.PathLike, names: Sequence[str] | None = None, *,
                  folders: dict[str, str | os.PathLike] | None = None) -> dict[str, Path]:
    """Writes each adapter (``names``: default all) as a PEFT adapter folder, ``directory/<name>/`` (or
    ``folders[name]``): ``PeftModel.from_pretrained(base_model, folder)`` loads it alone. Atomic per folder
    (``adapters.write_adapter_folder``). Returns name → folder."""
    state = _require(model, "save_adapters")
    names = list(state.configs) if names is None else list(names)
    unknown = sorted(set(names) - set(state.configs))
    if unknown:
        raise ValueError(f"save_adapters: no adapter {unknown} (adapters: {list(state.configs)})")
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    written = {}
    for name in names:
        tensors = {k: t.detach().cpu().contiguous().clone() for k, t in _file_tensors(model, state, name).items()}
        conv1d = any(model.get_submodule(p).weight_layout == "conv1d" for p in state.targets[name])
        config = state.configs[name].to_peft_dict(base_model_name_or_path=name_or_path, fan_in_fan_out=conv1d)
        folder = Path(folders[name]) if folders and name in folders else Path(directory) / name
        write_adapter_folder(folder, tensors, config)
        written[name] = folder
    return written


def load_adapters(model: nn.Module, folders: dict[str, str | os.PathLike]) -> nn.Module:
    """Loads PEFT adapter folders (``save_adapters``', ``save_adapter``'s or PEFT's ``save_pretrained``'s) by name:
    into a model without adapters it first injects them per their configs; into one with them, each name must be one
    of its adapters with the same shapes. Every key and shape is checked before anything is written."""
    read = {name: read_adapter_folder(path) for name, path in folders.items()}
    state = get_multi_state(model)
    if state is None:
        inject_adapters(model, {name: config for name, (_, config, _) in read.items()})
        state = get_multi_state(model)
        injected = True
    else:
        injected = False
        unknown = sorted(set(folders) - set(state.configs))
        if unknown:
            raise ValueError(f"load_adapters: the model has no adapter {unknown} (adapters: {list(state.configs)}); "
                             "load into a fresh model to add adapters")
    writes = []
    try:
        for name, (_, _, tensors) in read.items():
            want = _file_tensors(model, state, name)
            named = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in tensors.items()}
            missing, unexpected = sorted(set(want) - set(named)), sorted(set(named) - set(want))
            bad = [f"{k} has shape {tuple(named[k].shape)}, the model needs {tuple(want[k].shape)}"
                   for k in sorted(set(want) & set(named)) if named[k].shape != want[k].shape]
            if missing or unexpected or bad:
                raise ValueError(f"load_adapters: {os.fspath(folders[name])!r} does not fit adapter {name!r}: "
                                 f"{len(missing)} keys missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                                 f"(e.g. {unexpected[:2]}){'; ' + '; '.join(bad[:3]) if bad else ''}. Nothing was "
                                 "loaded")
            writes += [(want[k], named[k]) for k in want]
    except BaseException:
        if injected:
            unload_adapters(model)
        raise
    with torch.no_grad():
        for param, value in writes:
            param.copy_(value)
    return model
