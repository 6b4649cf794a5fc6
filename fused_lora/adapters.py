"""Save and load adapters in PEFT's on-disk format (``adapter_model.safetensors`` + ``adapter_config.json``).

Key names, as ``peft.PeftModel.save_pretrained`` writes them (``peft/utils/save_and_load.py``):

    base_model.model.<layer>.lora_A.weight        ↔ our <layer>.lora_A            (r × in)
    base_model.model.<layer>.lora_B.weight        ↔ our <layer>.lora_B            (out × r)
    base_model.model.<layer>.lora_magnitude_vector ↔ our <layer>.lora_magnitude_vector (out; DoRA, use_dora=True)
    base_model.model.<layer>.base_layer.bias      ↔ our <layer>.bias              (bias="lora_only"/"all")
    base_model.model.<name>.bias                  ↔ our <name>.bias               (bias="all", other biases)
    base_model.model.<module>.<key>               ↔ our <module>.<key>            (modules_to_save state_dict)

PEFT keeps a trained copy of each modules_to_save module under ``<module>.modules_to_save.<adapter>`` and saves
it without that infix, so the file key is the module's own key: we train the module in place and save the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig, pattern_key
from .injector import (
    InjectionPlan,
    check_not_injected,
    get_state,
    in_out_features,
    inject_lora,
    lora_layers,
    plan_injection,
    unload_lora,
)

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"  # older PEFT saves (safe_serialization=False)
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# save_adapter stores a SHA-256 of the tensors in the safetensors metadata (PEFT ignores it): load_adapter checks it,
# so a file corrupted inside its data (which safetensors cannot notice) is refused instead of loaded as noise.
DIGEST_KEY = "fused_lora.sha256"


# ---------------------------------------------------------------------------------------------------------------
# Which tensors an adapter holds, and their file names
# ---------------------------------------------------------------------------------------------------------------

def _under(key: str, paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in paths)


def adapter_shapes(model: nn.Module, plan: InjectionPlan) -> dict[str, tuple[int, ...]]:
    """Model state_dict key → shape of every tensor an adapter file holds for ``plan``. Works on the plain model
    (before injection: the LoRA shapes come from the layers' sizes) and on the injected one alike."""
    config, shapes = plan.config, {}
    for path in plan.targets:
        module = model.get_submodule(path)
        fan_in, fan_out = in_out_features(module)
        r = config.rank_for(path)  # rank_pattern's rank for this module, else config.r
        shapes[f"{path}.lora_A"] = (r, fan_in)
        shapes[f"{path}.lora_B"] = (fan_out, r)
        if config.use_dora:  # PEFT's key has no ".weight": get_peft_model_state_dict strips it for DoRA
            shapes[f"{path}.lora_magnitude_vector"] = (fan_out,)
        if config.bias == "lora_only" and module.bias is not None:
            shapes[f"{path}.bias"] = tuple(module.bias.shape)
    if config.bias == "all":
        # PEFT picks state_dict keys (buffers included) named "bias" here; modules_to_save come next, in full.
        for key, tensor in model.state_dict().items():
            if (key == "bias" or key.endswith(".bias")) and not _under(key, plan.modules_to_save):
                shapes[key] = tuple(tensor.shape)
    for path in plan.modules_to_save:
        for key, tensor in model.get_submodule(path).state_dict().items():
            shapes[f"{path}.{key}"] = tuple(tensor.shape)
    return shapes


def file_key(model_key: str, targets: set[str]) -> str:
    """Our model key → PEFT's adapter file key."""
    path, _, leaf = model_key.rpartition(".")
    if path in targets:
        if leaf in ("lora_A", "lora_B"):
            return f"{PEFT_PREFIX}{path}.{leaf}.weight"
        if leaf == "bias":
            return f"{PEFT_PREFIX}{path}.base_layer.bias"
    return PEFT_PREFIX + model_key


def _is_peft_modules_to_save_copy(key: str, plan: InjectionPlan) -> bool:
    """PEFT's bias="all" also writes the biases of its two modules_to_save copies (``<m>.original_module.*`` and
    ``<m>.modules_to_save.*``); the trained values are under ``<m>.*`` as well, so these duplicates are skipped."""
    key = key.removeprefix(PEFT_PREFIX)
    return any(key.startswith(f"{m}.original_module.") or key.startswith(f"{m}.modules_to_save.")
               for m in plan.modules_to_save)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def _write_temp(directory: Path, name: str, write: Callable[[str], None]) -> str:
    """``write``s a hidden temporary file beside ``name`` and flushes it to disk; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _backup(target: Path) -> str | None:
    """A second name for ``target``'s current content (a hard link, else a copy), or None when it does not exist."""
    if not target.exists():
        return None
    fd, backup = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bak", dir=target.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(target, backup)
    except OSError:  # a file system without hard links
        shutil.copy2(target, backup)
    return backup


def _atomic_write_all(directory: Path, writers: dict[str, Callable[[str], None]]) -> None:
    """Writes every file of ``writers`` (name → writer of a path), all or none.

    Every file is written in full to a temporary file first, so a failing write (disk full, an exception, a bad
    tensor) leaves the folder exactly as it was. Then each temporary file is renamed over its target
    (``os.replace``, atomic on POSIX and Windows) after keeping a second name for the old file; if a rename fails,
    the files already replaced get their old content back. Only a hard kill between the renames (microseconds)
    can leave new weights beside the old config, which load_adapter then refuses with a shape/key error."""
    temps: dict[str, str] = {}
    backups: dict[str, str | None] = {}
    try:
        for name, write in writers.items():
            temps[name] = _write_temp(directory, name, write)
        try:
            for name, tmp in temps.items():
                backups[name] = _backup(directory / name)
                os.replace(tmp, directory / name)
        except BaseException:
            for name, backup in backups.items():
                if backup is None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(directory / name)  # there was no previous file
                else:
                    os.replace(backup, directory / name)
            raise
        with contextlib.suppress(OSError):  # make the renames durable (POSIX; not possible on Windows)
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        for leftover in [*temps.values(), *(b for b in backups.values() if b is not None)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _read_config_json(directory: Path) -> tuple[dict, LoRAConfig]:
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {os.fspath(directory)!r}; pass the folder that "
                                "save_adapter or peft's save_pretrained wrote")
    source = os.fspath(config_file)
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {source} is not valid JSON ({err}); the file is truncated or corrupted. "
                         "Save the adapter again (the model was not changed)") from err
    return data, LoRAConfig.from_peft_dict(data, source=source)


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` of an adapter folder (written by :func:`save_adapter` or PEFT)."""
    return _read_config_json(Path(path))[1]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (what ``DIGEST_KEY`` holds)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    source = os.fspath(file)
    try:
        with safe_open(source, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors' SafetensorError, OSError, ...: the file cannot be read as safetensors
        raise ValueError(f"load_adapter: {source} is not a readable safetensors file ({err}); it is truncated or "
                         "corrupted. Save the adapter again (the model was not changed)") from err
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise ValueError(f"load_adapter: {source} is corrupted: its tensors do not match the SHA-256 save_adapter "
                         "stored in it. Save the adapter again (the model was not changed)")
    return tensors


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).is_file():
        return _read_safetensors(directory / WEIGHTS_NAME)
    if (directory / WEIGHTS_NAME_BIN).is_file():
        source = os.fspath(directory / WEIGHTS_NAME_BIN)
        try:
            tensors = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"load_adapter: {source} cannot be read ({err}); it is truncated or corrupted "
                             "(the model was not changed)") from err
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"load_adapter: {source} does not hold a dict of tensors (the model was not changed)")
        return tensors
    raise FileNotFoundError(f"load_adapter: neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN} in {os.fspath(directory)!r}")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The injected model inside a data-parallel wrapper (DDP, a DeepSpeed engine: both keep it as ``.module``)."""
    while get_state(model) is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitioned (an empty placeholder outside its module's forward)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_numel")


def _is_fsdp1(model: nn.Module) -> bool:
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def _adapter_tensors(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """State-dict key → the full tensor, on the CPU. On a sharded model only these tensors are gathered, never the
    frozen base: FSDP2's DTensors one by one (``full_tensor``), ZeRO-3's partitioned parameters together
    (``deepspeed.zero.GatheredParameters``, the adapter's size). Every rank must then take part, in the same order
    (``keys``'s)."""
    if _is_fsdp1(model):
        raise ValueError("save_adapter: the model is wrapped by FSDP1 (FullyShardedDataParallel), whose parameters are "
                         "views into flat shards; gather its full state dict on rank 0 (torch.distributed.checkpoint"
                         ".state_dict.get_model_state_dict with full_state_dict=True, cpu_offload=True), load it into "
                         "an unsharded copy of the injected model and save that (docs/distributed.md), or use FSDP2")
    named = {**dict(model.named_buffers(remove_duplicate=False)),
             **dict(model.named_parameters(remove_duplicate=False))}
    state = None
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in named:  # a key a state-dict hook made (none of an adapter's today): the state dict's tensor
            state = state if state is not None else model.state_dict()
            named[key] = state[key]
        tensors[key] = named[key]
    zero3 = [t for t in tensors.values() if _is_zero3_partitioned(t)]
    if zero3:
        import deepspeed  # its zero namespace is an attribute, not an importable module

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            tensors = {k: t.detach().clone() if _is_zero3_partitioned(t) else t for k, t in tensors.items()}
    for key, tensor in tensors.items():
        if type(tensor).__name__ == "DTensor":  # FSDP2 (fully_shard): an all-gather of this tensor alone
            tensors[key] = tensor.full_tensor()
    return {k: t.detach().cpu() for k, t in tensors.items()}


def _is_rank0() -> bool:
    """Rank 0 of the default process group, or no process group at all."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def save_adapter(model: nn.Module, path: str | os.PathLike, *, is_main_process: bool | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``path`` in PEFT's format,
    so that ``peft.PeftModel.from_pretrained(base_model, path)`` loads it. The pair is written atomically: if saving
    fails, the folder keeps the previous adapter byte for byte, and no temporary file is left.

    A model inside DDP or a DeepSpeed engine may be passed as it is (its ``.module`` is saved). On a sharded model
    (FSDP2's ``fully_shard``, DeepSpeed ZeRO-3) **every rank must call it**: only the adapter's tensors are gathered
    (never the frozen base). ``is_main_process`` says whether this process writes, as in PEFT's ``save_pretrained``;
    by default rank 0 writes when a process group is initialized (so every rank may call it, as a sharded model
    requires), and the calling process otherwise. ``state_dict``: the model's state dict gathered already (as an
    engine hands it over, e.g. FSDP1's full state dict on the main process): the adapter's tensors are read from it,
    and nothing is gathered."""
    model = _unwrapped(model)
    state = get_state(model)
    if state is None:
        what = "fused LoRA layers not made by inject_lora" if lora_layers(model) else "no fused LoRA layers"
        raise ValueError(f"save_adapter: {type(model).__name__} has {what}; save_adapter needs the config that "
                         "inject_lora(model, config) or load_adapter(model, path) records on the model")
    plan = state.plan
    targets = set(plan.targets)
    keys = list(adapter_shapes(model, plan))
    if state_dict is not None:
        if is_main_process is False:
            return
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ValueError(f"save_adapter: the state_dict passed lacks {len(missing)} of the adapter's {len(keys)} "
                             f"tensors, e.g. {missing[:3]}; pass the model's full state dict (keys as in "
                             "model.state_dict())")
        gathered = {k: state_dict[k].detach().cpu() for k in keys}
    else:
        gathered = _adapter_tensors(model, keys)
        if not (_is_rank0() if is_main_process is None else is_main_process):
            return
    tensors, seen = {}, set()
    for key, tensor in gathered.items():
        tensor = tensor.contiguous()
        # safetensors refuses tensors sharing storage (tied weights inside a modules_to_save module): copy those.
        ptr = (tensor.device, tensor.untyped_storage().data_ptr())
        tensors[file_key(key, targets)] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    conv1d = any(model.get_submodule(t).weight_layout == "conv1d" for t in plan.targets)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    write_adapter_folder(path, tensors, plan.config.to_peft_dict(base_model_name_or_path=name_or_path,
                                                                 fan_in_fan_out=conv1d))


def write_adapter_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config_dict: dict) -> None:
    """Writes one adapter folder in PEFT's format: ``tensors`` (by file key, contiguous CPU tensors sharing no storage)
    into ``adapter_model.safetensors`` with their SHA-256, ``config_dict`` (``LoRAConfig.to_peft_dict``) into
    ``adapter_config.json``; both or neither (see :func:`save_adapter`)."""
    # Top-level keys sorted as PEFT writes them; rank_pattern / alpha_pattern keep their order, unlike PEFT's
    # json.dumps(sort_keys=True): the first matching key wins, so sorting them can give a module another rank than
    # the one it was trained with (and a file that PEFT itself cannot load back).
    config_json = json.dumps(dict(sorted(config_dict.items())), indent=2)
    metadata = {"format": "pt", DIGEST_KEY: tensors_digest(tensors)}
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_json + "\n")

    _atomic_write_all(directory, {WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=metadata),
                                  CONFIG_NAME: write_config})


def read_adapter_folder(path: str | os.PathLike) -> tuple[dict, LoRAConfig, dict[str, torch.Tensor]]:
    """(the config as written, its :class:`LoRAConfig`, the tensors by file key) of an adapter folder written by
    :func:`save_adapter`, :func:`write_adapter_folder` or PEFT; a corrupted file is refused with a clear error."""
    directory = Path(path)
    if not directory.is_dir():
        raise NotADirectoryError(f"load_adapter: {os.fspath(path)!r} is not a folder; pass the folder holding "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    data, config = _read_config_json(directory)
    return data, config, _read_weights(directory)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def _check_injected_matches(model: nn.Module, plan: InjectionPlan, source: str) -> None:
    """The adapter's config must describe the layers the model already has."""
    layers = lora_layers(model)
    config = plan.config
    want, have = set(plan.targets), set(layers)
    if want != have:
        raise ValueError(f"load_adapter: {source} adapts {len(want)} modules but the model has fused LoRA layers on "
                         f"{len(have)}; only in the adapter: {sorted(want - have)[:5]}, only in the model: "
                         f"{sorted(have - want)[:5]}. Load it into a fresh model, or unload_lora(model) first")
    for path in plan.targets:
        layer = layers[path]
        r, alpha, scaling = config.rank_for(path), config.alpha_for(path), config.scaling_for(path)
        if layer.r != r or abs(layer.scaling - scaling) > 1e-12 * max(1.0, abs(scaling)):
            raise ValueError(f"load_adapter: {source} has r={r}, lora_alpha={alpha}, use_rslora={config.use_rslora} "
                             f"(scaling {scaling:g}){_from_patterns(config, path)} but layer {path!r} has r={layer.r}, "
                             f"scaling {layer.scaling:g}. Load it into a fresh model, or unload_lora(model) first")
        if layer.merged:
            raise ValueError(f"load_adapter: layer {path!r} is merged; call unmerge_lora(model) before loading "
                             "new adapter weights")
        if layer.use_dora != config.use_dora:
            raise ValueError(f"load_adapter: {source} has use_dora={config.use_dora} but layer {path!r} has "
                             f"use_dora={layer.use_dora}. Load it into a fresh model, or unload_lora(model) first")
    state = get_state(model)
    if state is not None:
        ours = state.plan
        if ours.config.bias != config.bias or set(ours.modules_to_save) != set(plan.modules_to_save):
            raise ValueError(f"load_adapter: {source} has bias={config.bias!r}, modules_to_save="
                             f"{plan.modules_to_save} but the model was injected with bias={ours.config.bias!r}, "
                             f"modules_to_save={ours.modules_to_save}. Load it into a fresh model, or "
                             "unload_lora(model) first")


def _from_patterns(config: LoRAConfig, path: str) -> str:
    """Which rank_pattern / alpha_pattern keys gave ``path`` its r and alpha, for error messages."""
    parts = [f"{what}[{key!r}]" for what, keys in (("rank_pattern", config.rank_pattern),
                                                    ("alpha_pattern", config.alpha_pattern))
             for key in [pattern_key(keys, path)] if key in keys]
    return f" for it (from {', '.join(parts)})" if parts else ""


def _match_tensors(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], plan: InjectionPlan,
                   source: str) -> dict[str, torch.Tensor]:
    """File tensors by model key, after checking names, shapes and dtypes against what ``plan`` expects."""
    targets = set(plan.targets)
    by_file_key = {file_key(k, targets): k for k in shapes}
    # Keys written without PEFT's "base_model.model." prefix (transformers' own adapter saving) are accepted too.
    named = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in tensors.items()}
    named = {k: v for k, v in named.items() if not _is_peft_modules_to_save_copy(k, plan)}
    unexpected = sorted(set(named) - set(by_file_key))
    missing = sorted(set(by_file_key) - set(named))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} keys the config does not explain, e.g. {unexpected[:3]}")
    if missing:
        problems.append(f"{len(missing)} keys missing, e.g. {missing[:3]}")
    for fkey in sorted(set(named) & set(by_file_key)):
        tensor, want = named[fkey], shapes[by_file_key[fkey]]
        if tuple(tensor.shape) != want:
            problems.append(f"{fkey} has shape {tuple(tensor.shape)}, the model needs {want}")
        elif not tensor.dtype.is_floating_point and by_file_key[fkey].rpartition(".")[2] in (
                "lora_A", "lora_B", "bias", "lora_magnitude_vector"):
            problems.append(f"{fkey} has dtype {tensor.dtype}; LoRA weights and biases must be floating point")
    if problems:
        raise ValueError(f"load_adapter: the adapter in {source} does not fit this model: "
                         + "; ".join(problems[:6]) + ". The model was left unchanged")
    return {by_file_key[k]: v for k, v in named.items()}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads an adapter saved by :func:`save_adapter` or by PEFT. Into a plain model it first injects LoRA layers per
    the adapter's ``adapter_config.json``; into a model already injected, the config must match its layers. Keys,
    shapes and config are all checked before the model is changed. Returns ``model``."""
    directory = Path(path)
    if not directory.is_dir():
        raise NotADirectoryError(f"load_adapter: {os.fspath(path)!r} is not a folder; pass the folder holding "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    source = os.fspath(directory)
    config_data, config = _read_config_json(directory)
    tensors = _read_weights(directory)
    injected = bool(lora_layers(model))
    if not injected:
        check_not_injected(model)
    plan = plan_injection(model, config)
    if injected:
        _check_injected_matches(model, plan, source)
    by_model_key = _match_tensors(tensors, adapter_shapes(model, plan), plan, source)
    _warn_other_base_model(model, config_data, source)
    if not injected:
        inject_lora(model, config)
    params = model.state_dict()  # detached views sharing the parameters' storage: copy_ writes into the model
    with torch.no_grad():
        before = {key: params[key].clone() for key in by_model_key}
        try:
            for key, tensor in by_model_key.items():
                params[key].copy_(tensor)
        except BaseException:  # nothing half-loaded: old values back, and the layers this call injected removed
            for key, value in before.items():
                params[key].copy_(value)
            if not injected:
                unload_lora(model, merge=False)
            raise
    return model


def _base_name(name: object) -> str | None:
    """The last path component of a model name or folder ("openai-community/gpt2" and "/models/gpt2/" → "gpt2")."""
    if not isinstance(name, str) or not name.strip("/\\"):
        return None
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _warn_other_base_model(model: nn.Module, config_data: dict, source: str) -> None:
    """Keys and shapes fit (checked before); a different base model *name* only warns: the same weights are often
    known under several names (hub id, local folder), and fine-tuned variants share the architecture."""
    theirs = config_data.get("base_model_name_or_path")
    ours = getattr(getattr(model, "config", None), "_name_or_path", None)
    if _base_name(theirs) and _base_name(ours) and _base_name(theirs) != _base_name(ours):
        warnings.warn(f"load_adapter: {source} was trained on base model {theirs!r} but this model is {ours!r}; "
                      "every key and shape fits, so it is loaded, but its outputs are only meaningful on the base "
                      "model it was trained on", UserWarning, stacklevel=3)
