"""``LoRAConfig``: PEFT's LoRA configuration words, with PEFT's meanings, for :func:`fused_lora.inject_lora`.

Only the fields the fused layer implements are here. ``to_peft_dict`` / ``from_peft_dict`` convert to and
from the ``adapter_config.json`` that ``peft.LoraConfig`` reads and writes, so adapters move both ways.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Copied from peft/utils/constants.py (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21.2) so that
# `target_modules=None` picks the same modules PEFT picks, without making peft a runtime dependency.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "lora_only", "all")
INIT_MODES = (True, False, "gaussian")
# Heads PEFT adds to modules_to_save for a task (PeftModelForSequenceClassification & co.): they are trained
# in full and never get a LoRA adapter.
TASK_HEADS: dict[str | None, tuple[str, ...]] = {
    None: (),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# PEFT LoraConfig fields that change what an adapter computes and that the fused layer does not implement: loading
# an adapter that uses one must fail loudly instead of silently computing something else.
_UNSUPPORTED_PEFT_FIELDS: dict[str, Any] = {
    "lora_bias": False,
    "target_parameters": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "monteclora_config": None,
}


def _string_list(value: Any, field: str) -> list[str] | None:
    """None stays None; a list/tuple/set of names becomes a de-duplicated list in the given order."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"LoRAConfig: {field} must be a list of module names, got the string {value!r}")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"LoRAConfig: {field} must be a list of module names, got {value!r}")
    names = list(dict.fromkeys(value))
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"LoRAConfig: {field} must hold strings, got {names!r}")
    return names


def _names_or_regex(value: Any, field: str) -> list[str] | str | None:
    """A regex string stays a string (PEFT: matched against the whole module name); a collection becomes a list."""
    return value if value is None or isinstance(value, str) else _string_list(value, field)


def _pattern_regex(key: str) -> str:
    # peft.utils.other.get_pattern_key (peft 0.21.2): the key is a regular expression
    # that must match the end of the module name, either the whole name or a part after a dot.
    return rf"(.*\.)?({key})$"


def pattern_matches(key: str, name: str) -> bool:
    """Whether the rank_pattern / alpha_pattern ``key`` (a regex) matches the module ``name`` as a whole or as a
    suffix after a ``.``."""
    return re.match(_pattern_regex(key), name) is not None


def pattern_key(keys: Iterable[str], name: str) -> str:
    """PEFT's ``get_pattern_key``: the first key (in order) that matches ``name`` (:func:`pattern_matches`), else
    ``name`` itself."""
    return next((key for key in keys if pattern_matches(key, name)), name)


def _pattern(value: Any, what: str) -> dict[str, Any]:
    """A rank_pattern / alpha_pattern: a dict of regex keys (checked to compile) to positive int ranks / numbers."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"LoRAConfig: {what} must be a dict of module names or regexes to "
                        f"{'ranks' if what == 'rank_pattern' else 'alphas'}, got {value!r}")
    checked = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"LoRAConfig: {what} keys must be strings (module names or regexes), got {key!r}")
        try:
            re.compile(_pattern_regex(key))
        except re.error as err:
            raise ValueError(f"LoRAConfig: {what} key {key!r} is not a valid regular expression ({err})") from None
        if what == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"LoRAConfig: {what}[{key!r}]={v!r} must be a positive integer (a rank)")
        if what == "alpha_pattern" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise TypeError(f"LoRAConfig: {what}[{key!r}]={v!r} must be a number (a lora_alpha)")
        checked[key] = v
    return checked


@dataclass
class LoRAConfig:
    """What to adapt and how, in PEFT's words (``peft.LoraConfig``'s field names, defaults and meanings).

    Args:
        r: adapter rank.
        lora_alpha: the scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout probability on the LoRA branch's input, in [0, 1] (1, as in PEFT and nn.Dropout: the
            branch contributes nothing while training).
        target_modules: module names matched exactly or as a ``.name`` suffix of the full module name; a string
            is a regex matched against the whole name; ``"all-linear"`` means every ``nn.Linear`` / ``Conv1D``
            except the output embedding (``lm_head``). ``None`` picks the architecture's usual targets.
        exclude_modules: names (exact or ``.name`` suffix) or a regex (whole name) never to adapt.
        layers_to_transform: only adapt modules of these layer indices (an int or a list).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) holding those indices.
        bias: ``"none"``, ``"lora_only"`` (the adapted layers' biases train) or ``"all"`` (every bias trains).
        modules_to_save: modules trained in full (e.g. a new classification head). Unlike PEFT, they are trained
            in place: no frozen copy is kept.
        use_rslora: rank-stabilized scale ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True`` (A kaiming-uniform, B zeros), ``"gaussian"`` (A normal(1/r), B zeros) or
            ``False`` (both random; for tests).
        task_type: ``None``, ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (the ``score``/``classifier`` head is trained in full
            and never adapted); PEFT's ``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ``"SEQ_2_SEQ_LM"`` and
            ``"FEATURE_EXTRACTION"`` are accepted too.
        use_dora: DoRA (weight-decomposed LoRA, PEFT's meaning): each adapted layer gets a trainable
            ``lora_magnitude_vector`` and computes ``x Wᵀ + b + (g − 1) ⊙ (x_d Wᵀ) + g ⊙ s·B A x_d`` with
            g = magnitude / ‖W + s·B A‖ per output row (``docs/dora.md``). nn.Linear and Conv1D bases only.
        rank_pattern: module name or regex → the rank of the modules it matches, instead of ``r``. PEFT's matching
            (``get_pattern_key``): a key matches a module whose full name it matches as a whole or as a suffix after
            a ``.`` (``"q_proj"``, ``"layers.0.self_attn.q_proj"``, ``"model.layers.[01].*"``); the first
            matching key, in the dict's order, wins. :func:`~fused_lora.save_adapter` keeps that order in
            ``adapter_config.json``; PEFT's ``save_pretrained`` sorts the keys, which changes the winner where two keys
            match one module (PEFT then cannot load its own file back; neither can fused_lora, with a shape error).
        alpha_pattern: the same for ``lora_alpha``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    task_type: str | None = None
    use_dora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig: r={self.r!r} must be a positive integer")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"LoRAConfig: lora_alpha={self.lora_alpha!r} must be a number")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise TypeError(f"LoRAConfig: lora_dropout={self.lora_dropout!r} must be a number in [0, 1]")
        if not 0.0 <= self.lora_dropout <= 1.0:
            raise ValueError(f"LoRAConfig: lora_dropout={self.lora_dropout} must be in [0, 1]")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig: bias={self.bias!r}; use one of {BIAS_MODES}")
        if self.init_lora_weights not in INIT_MODES or not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"LoRAConfig: init_lora_weights={self.init_lora_weights!r}; use True, False or "
                             "'gaussian'")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoRAConfig: use_dora={self.use_dora!r} must be True or False")
        if self.task_type not in TASK_HEADS:
            raise ValueError(f"LoRAConfig: task_type={self.task_type!r}; use one of {list(TASK_HEADS)}")
        self.target_modules = _names_or_regex(self.target_modules, "target_modules")
        self.exclude_modules = _names_or_regex(self.exclude_modules, "exclude_modules")
        self.modules_to_save = _string_list(self.modules_to_save, "modules_to_save")
        self.rank_pattern = _pattern(self.rank_pattern, "rank_pattern")
        self.alpha_pattern = _pattern(self.alpha_pattern, "alpha_pattern")
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = _string_list(self.layers_pattern, "layers_pattern")
        if isinstance(self.layers_to_transform, (list, tuple, set)):
            self.layers_to_transform = list(self.layers_to_transform)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers_to_transform):
                raise TypeError(f"LoRAConfig: layers_to_transform must be ints, got {self.layers_to_transform!r}")
        elif self.layers_to_transform is not None and (
                isinstance(self.layers_to_transform, bool) or not isinstance(self.layers_to_transform, int)):
            raise TypeError(f"LoRAConfig: layers_to_transform={self.layers_to_transform!r} must be an int or a list "
                            "of ints")
        # The same consistency rules as peft.LoraConfig.
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("LoRAConfig: layers_to_transform / layers_pattern cannot be used when target_modules is "
                             "a regex string; put the layer index in the regex instead")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoRAConfig: layers_pattern is set but layers_to_transform is not; give the layer "
                             "indices to adapt")

    @property
    def scaling(self) -> float:
        """The scale of modules no ``rank_pattern`` / ``alpha_pattern`` key matches."""
        return self.lora_alpha / self.r ** 0.5 if self.use_rslora else self.lora_alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of the module ``name`` (its full name in the model): ``rank_pattern``'s, else ``r``."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, name), self.r)

    def alpha_for(self, name: str) -> float:
        """The ``lora_alpha`` of the module ``name``: ``alpha_pattern``'s, else ``lora_alpha``."""
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, name), self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        """The module's scale, PEFT's ``update_layer``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def effective_modules_to_save(self) -> list[str]:
        """``modules_to_save`` plus the task's head names (what PEFT puts in its saved config)."""
        names = list(self.modules_to_save or [])
        return list(dict.fromkeys(names + list(TASK_HEADS[self.task_type])))

    def replace(self, **changes: Any) -> LoRAConfig:
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self, *, base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False) -> dict:
        """The ``adapter_config.json`` content ``peft.PeftConfig.from_pretrained`` reads."""
        target = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": target if isinstance(target, str) or target is None else sorted(target),
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "bias": self.bias,
            "modules_to_save": self.effective_modules_to_save() or None,
            "use_rslora": self.use_rslora,
            "init_lora_weights": self.init_lora_weights,
            # GPT-2's Conv1D stores its weight in×out; PEFT wants this flag for it (it warns and sets it otherwise).
            "fan_in_fan_out": fan_in_fan_out,
            "use_dora": self.use_dora,
            "lora_bias": False,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = "adapter_config.json") -> LoRAConfig:
        """Reads a PEFT LoRA ``adapter_config.json`` dict; refuses features the fused layer does not compute. Every
        error names ``source``."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of LoRA settings, got {type(data).__name__}; this is "
                             "not an adapter_config.json")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type={peft_type!r}; fused_lora loads LoRA adapters only")
        for field, neutral in _UNSUPPORTED_PEFT_FIELDS.items():
            value = data.get(field, neutral)
            if value not in (neutral, None, False, {}, []):
                raise ValueError(f"{source}: {field}={value!r} is a PEFT feature fused_lora does not implement; "
                                 "load this adapter with peft instead")
        if "r" not in data:
            raise ValueError(f"{source}: no 'r' (the adapter rank); a LoRA adapter_config.json always has one. "
                             "Save the adapter again")
        use_rslora = data.get("use_rslora", False)
        if not isinstance(use_rslora, bool) and use_rslora is not None:
            raise ValueError(f"{source}: use_rslora={use_rslora!r} must be true or false")
        init = data.get("init_lora_weights", True)
        # PiSSA/OLoRA/LoftQ/... only decide the *initial* A and B, which the file's tensors overwrite.
        init = init if init in INIT_MODES and isinstance(init, (bool, str)) else True
        use_dora = data.get("use_dora", False)
        if not isinstance(use_dora, bool) and use_dora is not None:
            raise ValueError(f"{source}: use_dora={use_dora!r} must be true or false")
        try:
            return cls._from_checked_peft_dict(data, bool(use_rslora), init).replace(use_dora=bool(use_dora))
        except (TypeError, ValueError) as err:  # LoRAConfig's own checks: say which file holds the bad value
            raise type(err)(f"{source}: {err}. Fix the file or save the adapter again") from None

    @classmethod
    def _from_checked_peft_dict(cls, data: dict, use_rslora: bool, init: bool | str) -> LoRAConfig:
        return cls(
            r=data["r"],
            lora_alpha=data.get("lora_alpha", 8),
            lora_dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save"),
            use_rslora=use_rslora,
            init_lora_weights=init,
            task_type=data.get("task_type"),
            rank_pattern=data.get("rank_pattern"),
            alpha_pattern=data.get("alpha_pattern"),
        )
