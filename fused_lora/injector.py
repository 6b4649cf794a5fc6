"""Put fused ``LoRALinear`` layers into a model where PEFT would put its LoRA layers, and take them out again.

    model = inject_lora(model, LoRAConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))

The model stays the same ``nn.Module`` (no wrapper): targeted ``nn.Linear`` / GPT-2 ``Conv1D`` modules are
replaced in place by ``LoRALinear`` modules that share their weight and bias, so parameter names (and a base
checkpoint's keys) do not change. Target matching follows ``peft.tuners.tuners_utils.check_target_module_exists``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import bases
from .bases import conv1d_class, unsupported_quantized_message
from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, TASK_HEADS, LoRAConfig, pattern_matches
from .dispatch import DORA, refusal
from .layer import LoRALinear

STATE_ATTR = "_fused_lora_state"
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_EXCLUDED = "excluded"


@dataclass
class InjectionPlan:
    """What :func:`inject_lora` will do, worked out without touching the model."""

    config: LoRAConfig  # target_modules resolved (defaults, "all-linear")
    targets: list[str]  # module paths that get an adapter
    modules_to_save: list[str]  # module paths trained in full


@dataclass
class _LoRAState:
    """Kept on the model (``model._fused_lora_state``) so save/merge/unload know what inject did."""

    plan: InjectionPlan
    originals: dict[str, nn.Module]  # the replaced modules, to give back their exact type on unload
    requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list)  # flags before injection


def _is_peft_layer(module: nn.Module) -> bool:
    # By class name, so that peft (a test extra) need not be importable.
    return any(cls.__name__ == "BaseTunerLayer" for cls in type(module).__mro__)


def _linear_kind(module: nn.Module) -> str | None:
    """'linear' / 'conv1d' for layers LoRA can wrap (a LoRALinear counts, for planning on an injected model): those of
    a registered base kind, and any other nn.Linear / Conv1D (whose non-float weight is refused with its reason)."""
    if isinstance(module, LoRALinear):
        return module.weight_layout
    kind = bases.of(module)
    if kind is not None:
        return kind.layout(module)
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    kind = bases.of(module)
    if kind is not None:
        return kind.in_out(module)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: in×out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's ``LoRALinear`` modules by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_state(model: nn.Module) -> _LoRAState | None:
    return model.__dict__.get(STATE_ATTR)


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no fused LoRA layers; call inject_lora(model, config) "
                         "or load_adapter(model, path) first")
    return layers


# ---------------------------------------------------------------------------------------------------------------
# Matching (PEFT's rules)
# ---------------------------------------------------------------------------------------------------------------

def _output_head_names(model: nn.Module, config: LoRAConfig) -> set[str]:
    """Modules "all-linear" never targets: the output embedding, or a SEQ_CLS head (peft's
    ``_maybe_include_all_linear_layers``)."""
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = get_out()
    if head is None and config.task_type == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if getattr(model, n, None) is not None), None)
    if head is None:
        return set()
    return {name for name, m in model.named_modules() if m is head}


def resolve_target_modules(model: nn.Module, config: LoRAConfig) -> list[str] | str:
    """``config.target_modules`` with ``None`` replaced by the architecture's default and ``"all-linear"`` by the
    names of every linear layer but the output head."""
    target = config.target_modules
    if target is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"inject_lora: target_modules=None, and {type(model).__name__} (model_type="
                             f"{model_type!r}) has no default targets; pass target_modules, e.g. ['q_proj', 'v_proj'] "
                             "or 'all-linear'")
        default = DEFAULT_TARGET_MODULES[model_type]
        return default if isinstance(default, str) else list(default)
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        heads = _output_head_names(model, config)
        return sorted(name for name, m in model.named_modules() if _linear_kind(m) and name not in heads)
    return target


def match_target(config: LoRAConfig, key: str) -> bool | str:
    """PEFT's ``check_target_module_exists``: True / False, or ``"excluded"`` (by exclude_modules or because the
    module is, or is inside, a modules_to_save module). ``config.target_modules`` must be resolved."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _EXCLUDED
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _EXCLUDED
    # PEFT never adapts a modules_to_save module or anything inside one (the names are regex fragments there).
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.effective_modules_to_save()):
        return _EXCLUDED
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = config.layers_to_transform
    if found and indexes is not None and (not isinstance(indexes, list) or len(indexes) != 0):
        match = None
        patterns = config.layers_pattern
        if not patterns:
            # Lazy .*? takes the first numbered segment (the layer index), not e.g. an expert index further on.
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        found = index == indexes if isinstance(indexes, int) else index in indexes
    return found


def _match_modules_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    """PEFT's ``_set_trainable`` matching (``name.endswith(entry)``); modules nested in a chosen one are skipped
    (they train with it). Entries the user named must match something; the task's own head names need not."""
    names = config.effective_modules_to_save()
    chosen: list[str] = []
    hits: set[str] = set()
    for key, _ in model.named_modules():
        if not key:
            continue
        entries = [n for n in names if key.endswith(n)]
        if not entries:
            continue
        hits.update(entries)
        if not any(key.startswith(c + ".") for c in chosen):
            chosen.append(key)
    missing = [n for n in (config.modules_to_save or []) if n not in hits and n not in TASK_HEADS[config.task_type]]
    if missing:
        children = sorted(name for name, _ in model.named_children())
        raise ValueError(f"inject_lora: modules_to_save entries {missing} match no module of {type(model).__name__} "
                         f"(its top-level modules: {children}); give a module name or a suffix of its full name")
    return chosen


def _describe_linear_names(model: nn.Module) -> str:
    full = [name for name, m in model.named_modules() if _linear_kind(m)]
    if not full:
        return f"{type(model).__name__} has no nn.Linear or Conv1D module at all"
    short = sorted({name.rsplit(".", 1)[-1] for name in full})
    return (f"its linear (nn.Linear / Conv1D) modules are named {short} (e.g. {full[0]!r}); use those names, a "
            f"regex matched against the full name, or 'all-linear'")


def _no_match_error(model: nn.Module, config: LoRAConfig, excluded: list[str]) -> ValueError:
    why = f"inject_lora: target_modules={config.target_modules!r} matched no module"
    if config.layers_to_transform is not None:
        why += f" (with layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r})"
    if excluded:
        why += f"; {len(excluded)} matches were excluded by exclude_modules/modules_to_save (e.g. {excluded[0]!r})"
    return ValueError(f"{why}. {_describe_linear_names(model)}")


def _check_trainable_float(model: nn.Module, path: str, what: str) -> None:
    module = model.get_submodule(path)
    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point:
            raise TypeError(
                f"inject_lora: {what} {path!r} ({type(module).__name__}) holds parameter {name!r} of dtype {p.dtype} "
                f"(a quantized layer, e.g. bitsandbytes 4/8-bit): it cannot be trained. Keep this module in floating "
                f"point (e.g. BitsAndBytesConfig(llm_int8_skip_modules=[{path.rsplit('.', 1)[-1]!r}])) or leave it "
                "out of modules_to_save")


def plan_injection(model: nn.Module, config: LoRAConfig) -> InjectionPlan:
    """Works out and validates everything :func:`inject_lora` will do, without changing the model."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject_lora: config must be a fused_lora.LoRAConfig, got {type(config).__name__}")
    resolved = config.replace(target_modules=resolve_target_modules(model, config))
    modules_to_save = _match_modules_to_save(model, resolved)
    targets, excluded = [], []
    for key, module in model.named_modules():
        if not key:
            continue
        if any(key.startswith(t + ".") for t in targets):
            continue  # inside an adapted layer (a LoRALinear has no submodules; kept for safety)
        result = match_target(resolved, key)
        if result == _EXCLUDED:
            excluded.append(key)
            continue
        if not result:
            continue
        if _linear_kind(module) is None:
            served = ", ".join(k.describe for k in bases.registered())
            raise TypeError(f"inject_lora: target {key!r} is a {type(module).__name__}; fused LoRA adapts the layers "
                            f"of its registered base kinds ({served}). Narrow target_modules (a regex string matches "
                            "the whole module name) or add it to exclude_modules")
        dtype = module.weight.dtype
        inner = getattr(module, "base_layer", module)  # an injected QuantizedLoRALinear: its quantized layer
        kind = bases.of(inner)
        why = refusal(DORA, kind) if config.use_dora and kind is not None else None
        if why is not None:
            raise TypeError(f"inject_lora: target {key!r}: {why}")
        if (kind is None or not kind.quantized) and dtype not in _WEIGHT_DTYPES:
            raise TypeError(unsupported_quantized_message(f"inject_lora: target {key!r}", type(module).__name__,
                                                          dtype))
        targets.append(key)
    if not targets:
        raise _no_match_error(model, resolved, excluded)
    for path in modules_to_save:
        _check_trainable_float(model, path, "modules_to_save module")
    if config.bias == "all":
        for name, p in model.named_parameters():
            if (name == "bias" or name.endswith(".bias")) and not p.dtype.is_floating_point:
                raise TypeError(f"inject_lora: bias='all' would train {name!r}, which is {p.dtype}; use bias='none' "
                                "or 'lora_only' with quantized models")
    return InjectionPlan(resolved, targets, modules_to_save)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

def check_not_injected(model: nn.Module) -> None:
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"inject_lora: {type(model).__name__} already has {len(existing)} fused LoRA layers (e.g. "
                         f"{next(iter(existing))!r}); adapters are not stacked. Call unload_lora(model) first, or "
                         "load_adapter(model, path) to load weights into the existing layers")
    peft_layers = [name for name, m in model.named_modules() if _is_peft_layer(m)]
    if peft_layers:
        raise ValueError(f"inject_lora: the model already has PEFT adapter layers (e.g. {peft_layers[0]!r}); call "
                         "merge_and_unload() or unload() on the PEFT model first")


def _warn_tied(model: nn.Module, modules_to_save: list[str]) -> None:
    inside = {id(p) for path in modules_to_save for p in model.get_submodule(path).parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in inside and not any(name.startswith(path + ".") for path in modules_to_save):
            warnings.warn(f"inject_lora: a modules_to_save parameter is shared with {name!r} (tied weights); "
                          "training it in place trains that one too", stacklevel=3)
            return


def _warn_unmatched_patterns(plan: InjectionPlan) -> None:
    """PEFT's warning (``BaseTuner.inject_adapter``): rank_pattern / alpha_pattern keys that match no target."""
    for what in ("rank_pattern", "alpha_pattern"):
        keys = getattr(plan.config, what)
        unmatched = sorted(k for k in keys if not any(pattern_matches(k, t) for t in plan.targets))
        if unmatched:
            warnings.warn(f"inject_lora: these {what} keys match no adapted module and are ignored: {unmatched} "
                          f"(a key matches a module's full name, or its end after a '.'; adapted: "
                          f"{plan.targets[:3]}{', …' if len(plan.targets) > 3 else ''})", RuntimeWarning, stacklevel=3)


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replaces the targeted ``nn.Linear`` / ``Conv1D`` modules with ``LoRALinear`` in place (sharing weights),
    freezes everything else, and makes trainable the LoRA parameters, the biases per ``config.bias`` and the
    ``modules_to_save`` modules. Returns ``model``. Everything is checked before the model is changed."""
    check_not_injected(model)
    plan = plan_injection(model, config)
    _warn_tied(model, plan.modules_to_save)
    _warn_unmatched_patterns(plan)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    originals: dict[str, nn.Module] = {}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for path in plan.targets:
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            layer = LoRALinear.from_linear(original, r=config.rank_for(path), lora_alpha=config.alpha_for(path),
                                           lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                                           init_lora_weights=config.init_lora_weights, use_dora=config.use_dora)
            layer.train(original.training)
            setattr(parent, child, layer)
            originals[path] = original
        _set_trainable(model, plan)
    except BaseException:
        # Nothing half-injected: put the original modules and requires_grad flags back, then re-raise.
        for path, original in originals.items():
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, original)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    model.__dict__[STATE_ATTR] = _LoRAState(plan, originals, flags)
    # every layer of a kind that prepares its layers, adapted or not (bitsandbytes 4-bit: kept in the standard packing;
    # on CPU an eval-mode forward would repack it for bitsandbytes' inference kernel, after which it passes no
    # gradient: README, QLoRA)
    bases.prepare_all(model)
    return model


def _set_trainable(model: nn.Module, plan: InjectionPlan) -> None:
    for path in plan.targets:
        layer = model.get_submodule(path)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if layer.use_dora:
            layer.lora_magnitude_vector.requires_grad_(True)
        if plan.config.bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    if plan.config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    for path in plan.modules_to_save:
        model.get_submodule(path).requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted like PEFT's ``get_nb_trainable_parameters`` (shared
    parameters once; a bitsandbytes ``Params4bit`` counts its unpacked size). No frozen copy of the
    ``modules_to_save`` modules exists here, so ``total`` is the base model's size plus the adapters."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


def _all_or_none(layers: list[LoRALinear], merge: bool) -> None:
    """Merges (or unmerges) every layer, or none: every layer's new weight is checked first (one at a time, so no
    more memory than one merge), and only then are the weights written. A layer that would refuse (non-finite
    adapters, overflow) raises before any weight changed."""
    todo = [layer for layer in layers if layer.merged != merge]
    for layer in todo:
        layer._merged_weight(merge)  # raises, naming the layer, when this layer's merge would be refused
    for layer in todo:
        (layer.merge if merge else layer.unmerge)()


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight (W += scaling·BA); forward then runs the base GEMMs only. Layers
    already merged are left as they are; if any layer refuses (non-finite adapters), no layer is merged."""
    _all_or_none(list(_require_lora(model, "merge_lora").values()), merge=True)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_lora` (exact up to the weight dtype's rounding); unmerged layers are left as they are."""
    _all_or_none(list(_require_lora(model, "unmerge_lora").values()), merge=False)
    return model


def _plain_module(layer: LoRALinear) -> nn.Module:
    """A new nn.Linear / Conv1D around the layer's weight and bias (for LoRALinear modules inject did not make); a
    quantized layer's own bitsandbytes module."""
    if hasattr(layer, "base_layer"):
        return layer.base_layer
    with torch.device("meta"):  # no throwaway allocation: the parameters are replaced right away
        if layer.weight_layout == "linear":
            module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        else:
            module = conv1d_class()(layer.out_features, layer.in_features)
    module.weight = layer.weight
    module.bias = layer.bias
    return module


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Takes the LoRA layers out again, giving back the original module types (Conv1D stays Conv1D), with the
    adapters merged into the weights (``merge=True``) or dropped (``merge=False``). ``requires_grad`` flags go back
    to what they were before :func:`inject_lora`; trained ``modules_to_save`` modules keep their training."""
    layers = _require_lora(model, "unload_lora")
    state = get_state(model)
    originals = state.originals if state is not None else {}
    _all_or_none(list(layers.values()), merge=merge)  # first, so that a refused merge leaves the model as it was
    for path, layer in layers.items():
        original = originals.get(path)
        if original is None or hasattr(layer, "base_layer"):  # a quantized layer keeps its bitsandbytes module
            original = _plain_module(layer)
        else:
            # The layer may hold new parameters (load_state_dict(assign=True), .to() on some torch versions).
            original.weight = layer.weight
            original.bias = layer.bias
        original.train(layer.training)
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, original)
    if state is not None:
        for p, flag in state.requires_grad:
            p.requires_grad_(flag)
        del model.__dict__[STATE_ATTR]
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the LoRA layers compute the base model's outputs, as PEFT's ``model.disable_adapter()``
    (merged layers are unmerged for the block and merged again after it). ``modules_to_save`` modules and trained
    biases are trained in place, so they keep their trained values here, unlike PEFT, which keeps frozen copies for
    this. (Not ``fused_lora.peft.disable()``, which stops serving PEFT models made afterwards.)"""
    layers = _require_lora(model, "disable_adapters")
    merged = [layer for layer in layers.values() if layer.merged]
    _all_or_none(merged, merge=False)
    try:
        with contextlib.ExitStack() as stack:
            for layer in layers.values():
                stack.enter_context(layer.disable_adapter())
            yield model
    finally:
        for layer in merged:
            layer.merge()


disable_lora = disable_adapters  # its name before: kept importing
