"""PEFT's own LoRA tests, run twice: plain, and with every model put through ``fused_lora.peft.accelerate``.

    python bench/peft_suite.py                       # all 3051 selected tests, plain + accelerated, compare
    python bench/peft_suite.py --selection quick     # 1367 of them (~2 min for both passes; CI runs this)
    python bench/peft_suite.py --via enable          # the accelerated pass through fused_lora.peft.enable() instead
    python bench/peft_suite.py --backend triton      # + a third pass through the Triton kernels (Triton's
                                                     #   interpreter on CPU) over the tests where the fused
                                                     #   Function ran (~1 min more on CPU; not for CI)
    python bench/peft_suite.py --list                # print the selected test ids and exit
    python bench/peft_suite.py --discover            # survey which test_custom_models.py / test_initialization.py
                                                     #   tests build LoRA models

What it does:

1. Fetches the source archive of the *installed* peft version from the package index (``pip download
   peft==<version> --no-binary :all: --no-deps``) and extracts its ``tests/`` folder into ``.cache/peft-suite/
   peft-<version>/`` (git-ignored; ``--cache DIR`` elsewhere, ``--sdist FILE`` uses an archive you have). Later runs
   reuse it. The sdist has no ``tests/__init__.py`` (PEFT's repository has one: the modules import each other
   relatively): an empty one is written. PEFT's ``pyproject.toml`` is not used (its addopts need pytest-cov).
2. Runs the selection below with pytest (``-p no:cacheprovider``, cwd in the cache, HF_HUB_OFFLINE=1), once plain
   and once with ``bench/peft_suite_plugin.py --fused-accelerate``, which patches ``get_peft_model``,
   ``inject_adapter_in_model``, ``PeftModel.from_pretrained`` and ``PeftMixedModel.from_pretrained`` (in every peft
   module that binds them and in the test modules) so that each returned model goes through
   ``fused_lora.peft.accelerate``, and counts swapped layers, calls of the fused Function and the reasons layers
   kept PEFT's forward. With ``--via enable`` the plugin calls ``fused_lora.peft.enable()`` instead
   (``--fused-enable``): PEFT's LoRA tuner serves every model it builds, PEFT's functions stay unpatched.
3. Compares per-test outcomes. Exit status: 0 no regression; 1 a test that passes plain fails or errors
   accelerated (except the ``INTENDED`` differences, listed apart: PEFT's check that adapter_names= raises in training
   mode, which fused_lora serves); 2 the runner could not do its job (download, collection, a pass crashed, or the
   accelerated pass swapped no layer / never called the fused Function: the patch did not take effect).

Outputs (JSON per pass, pytest logs, summary.md) go to ``<cache>/runs/<time>/`` or ``--out DIR``; never into the
repository.

Selection (fixed, made on peft 0.21.2; ``--discover`` redoes the survey for another version):

* ``tests/test_custom_models.py`` has 19485 tests for 40-odd PEFT methods. Its LoRA tests are (a) the 2606 tests
  parametrized by a LoRA case of ``TEST_CASES`` (ids ``<case>-<model>-LoraConfig-...``: 46 cases on MLP, Conv1D +
  Embedding, Conv1d/2d/3d, MHA and nn.Parameter models, with DoRA, KaSA, MiCA, VeLoRA, BD-LoRA, MonteCLoRA,
  lora_bias, dropout 0.1, modules_to_save and trainable tokens; 49 test methods: merge/unmerge/unload, safe merge,
  save/load and from_pretrained, several adapters, disable_adapter, training steps, fp16/bf16/autocast, FSDP state
  dicts, ...) and (b) the 197 tests of the 84 functions in ``LORA_TESTS`` below: those that built a LoRA model in
  an accelerated run of the file's 252 tests parametrized neither by a TEST_CASES entry nor for another PEFT method
  (``--discover``; a first survey over all 619 tests outside (a) found the same 84), without their
  parametrizations for other methods. 8 LoRA tests that need the Hub (gpt2/opt checkpoints; offline they fail
  before any model is built) are left out: listed above LORA_TESTS.
* ``tests/test_tuners_utils.py::TestModelAndLayerStatus``: ``get_layer_status``/``get_model_status``
  introspection, 77 tests (5 Hub ones excluded).
* ``tests/test_initialization.py``: the 171 tests of the 115 functions in ``INIT_TESTS`` below, those that
  built a LoRA model in an accelerated run of the file's 402 tests (init schemes, PiSSA/OLoRA/CorDA conversion with
  rank_pattern/alpha_pattern/rsLoRA, lora_bias, DoRA at init, KaSA, hotswapping, weight tying, key mapping), less 6
  that need scipy. ``test_lora_use_dora_linear`` (DoRA at init must leave the base output unchanged to the bit) failed
  accelerated by 2.4e-7 until the fused DoRA took PEFT's norm where PEFT's is exact; it passes now.
* ``tests/test_decoder_models.py`` is not run: every one of its tests loads a Hub checkpoint
  (``PEFT_DECODER_MODELS_TO_TEST``: tiny-random OPT/GPT-2/GPT-J/Llama/Qwen2/Gemma3/Mistral), and this machine and CI
  have no Hub, so no selection here holds it.
* PEFT 0.21.2's tests have no higher-order autograd (create_graph), torch.func or forward-mode AD test and none with
  ``lora_dropout=1.0``: this runner cannot cover those; fused_lora's own tests must.

``--selection lora`` (default) is all of it, 3051 tests. Measured on this project's 2-core CPU machine while other
jobs kept its load average at 2.4-4.7 (torch 2.13 CPU, OMP_NUM_THREADS=1): plain pass 74-75 s, accelerated 77-83 s
(wall, ~8 s start-up included), plus ~12 s to collect the selection on the first run: ~2.7 min for the pair, within
CI's 3-4 min (before test_initialization.py; with it, 2026-12-04 on a busier machine: 153 s and 151 s).
``--selection quick`` keeps all of (b), the status tests and the initialization tests but ``INIT_NOT_QUICK``, and
takes (a) for the 17 cases of ``SUBSET_CASES`` only (every test method still runs on them): 1367 tests, 50 s plain
and 70 s accelerated (2026-12-04; the 141 initialization tests add ~9 s and ~15 s of test time).

Threads: the child pytest runs with OMP_NUM_THREADS=1 unless it is set. PEFT's test models are a few dozen features
wide, so a second intra-op thread only adds synchronisation, and when anything else runs on a 2-core machine it
spin-waits for a core: measured back to back under the same load, OMP_NUM_THREADS=2 took 187 s (plain) and 173 s
(accelerated) where 1 thread took 74 s and 83 s.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PLUGIN = "peft_suite_plugin"  # bench/peft_suite_plugin.py, loaded with -p (bench/ goes on PYTHONPATH)
CUSTOM = "tests/test_custom_models.py"
STATUS = "tests/test_tuners_utils.py::TestModelAndLayerStatus"
INIT = "tests/test_initialization.py"

# Tests of test_custom_models.py that are not parametrized by a TEST_CASES entry and build LoRA models (found with
# --discover on peft 0.21.2). Their parametrizations for other PEFT methods (``[AdaLoraConfig]``...) are dropped.
# Left out because they need the Hub (gpt2 / opt checkpoints; offline they fail plain): test_gpt2_dora_merge_and_unload
# (+ _safe_merge), test_dora_save_and_load_remapping, test_multiple_adapters_automatic_modules_to_save,
# test_multiple_adapters_seq_cls_mixed_modules_to_save_merging_adapters, test_multiple_adapters_no_needless_copy_
# modules_to_save, test_delete_adapter_multiple_adapters_with_trainable_token_indices, TestDynamicDispatch::
# test_override_lora_linear.
LORA_TESTS = (
    "TestDefaultTargetModules::test_default_target_modules_list_of_str",
    "TestDefaultTargetModules::test_default_target_modules_str",
    "TestDynamicDispatch::test_custom_lora_layer_issues_warning",
    "TestDynamicDispatch::test_custom_lora_layer_used",
    "TestDynamicDispatch::test_saving_and_loading",
    "TestDynamicDispatch::test_target_layer_without_in_features_out_features",
    "TestDynamicDispatch::test_training_works",
    "TestLayerRepr::test_repr_lora_conv1d",
    "TestLayerRepr::test_repr_lora_conv2d",
    "TestLayerRepr::test_repr_lora_embedding",
    "TestLayerRepr::test_repr_lora_linear",
    "TestLayerRepr::test_repr_lora_paramwrapper",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_different_target_layers",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_disabled",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_length_mismatch_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_conv1d_emb",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_conv2d",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_but_dora_not_included_works",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_with_dora_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_wrong_adapter_name_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_merged_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_mha_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_mlp",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_multiple_modules_to_save",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_partly_overlapping_target_layers",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_training_mode_raises",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_unsupported_layer_raises",
    "TestMultiRankAdapter::test_multirank",
    "TestMultiRankAdapter::test_multirank_2",
    "TestMultipleActiveAdapters::test_multiple_active_dora_adapters_merge_matches_forward",
    "TestMultipleActiveAdapters::test_multiple_active_dora_adapters_safe_and_unsafe_merge_agree",
    "TestMultipleActiveAdapters::test_plain_lora_and_dora_adapters_merge_matches_forward",
    "TestPeftCustomModel::test_adapter_name_makes_no_difference",
    "TestPeftCustomModel::test_add_adapter_rejects_duplicate_name_without_mutation",
    "TestPeftCustomModel::test_add_weighted_adapter_cat_with_rank_pattern",
    "TestPeftCustomModel::test_add_weighted_adapter_negative_weight_negates_adapter",
    "TestPeftCustomModel::test_add_weighted_adapter_subtraction_with_negative_weights",
    "TestPeftCustomModel::test_add_weighted_adapter_with_different_scaling",
    "TestPeftCustomModel::test_delete_adapter_multiple_adapters_with_modules_to_save",
    "TestPeftCustomModel::test_delete_adapter_with_multiple_adapters_works",
    "TestPeftCustomModel::test_existing_model_card",
    "TestPeftCustomModel::test_ignore_mismatched_sizes_with_scalar_modules_to_save",
    "TestPeftCustomModel::test_load_does_not_overwrite_similarly_named_sibling",
    "TestPeftCustomModel::test_load_resized_embedding_ignore_mismatched_sizes",
    "TestPeftCustomModel::test_lora_safe_merge_does_not_mutate_base_layer_on_non_finite_bias",
    "TestPeftCustomModel::test_merge_with_lora_bias_when_base_layer_has_no_bias_warns_and_raises",
    "TestPeftCustomModel::test_mha_gradients_set_correctly",
    "TestPeftCustomModel::test_monteclora_variational_loss_computation",
    "TestPeftCustomModel::test_monteclora_variational_loss_computation_eval_mode",
    "TestPeftCustomModel::test_multiple_active_adapters_with_different_modules_to_save_works",
    "TestPeftCustomModel::test_multiple_active_adapters_with_different_trainable_token_indices_works",
    "TestPeftCustomModel::test_multiple_active_adapters_with_overlapping_modules_to_save_raises",
    "TestPeftCustomModel::test_multiple_active_adapters_with_same_modules_to_save_raises",
    "TestPeftCustomModel::test_multiple_active_adapters_with_same_trainable_token_indices_raises",
    "TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save",
    "TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save_merging_adapters",
    "TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save_order_switched",
    "TestPeftCustomModel::test_multiple_adapters_same_modules_to_save_merging_adapters_raises",
    "TestPeftCustomModel::test_non_existing_model_card",
    "TestPeftCustomModel::test_save_embedding_layers_excludes_similarly_named_sibling",
    "TestPeftCustomModel::test_save_pretrained_targeting_lora_to_embedding_layer",
    "TestPeftCustomModel::test_save_pretrained_targeting_lora_to_embedding_layer_non_transformers",
    "TestPeftCustomModel::test_set_adapter_non_overlapping_modules",
    "TestPeftCustomModel::test_set_adapter_non_overlapping_modules_to_save",
    "TestPeftCustomModel::test_set_adapter_non_overlapping_trainable_token_indices",
    "TestPeftCustomModel::test_set_requires_grad",
    "TestPeftCustomModel::test_unload_adapter_multihead_attention",
    "TestPeftCustomModel::test_weight_bias_attributes",
    "TestRequiresGrad::test_loading_adapter_preserves_custom_requires_grad",
    "TestRequiresGrad::test_loading_model_requires_grad_set_correctly",
    "TestRequiresGrad::test_loading_model_with_modules_to_save_requires_grad_set_correctly",
    "TestRequiresGrad::test_loading_model_with_trainble_tokens_requires_grad_set_correctly",
    "TestRequiresGrad::test_requires_grad_adalora_different_targets",
    "TestRequiresGrad::test_requires_grad_adalora_same_targets",
    "TestRequiresGrad::test_requires_grad_follows_inference_mode_modules_to_save",
    "TestRequiresGrad::test_requires_grad_follows_inference_mode_trainable_token_indices",
    "TestRequiresGrad::test_requires_grad_lora_conv2d",
    "TestRequiresGrad::test_requires_grad_lora_different_targets",
    "TestRequiresGrad::test_requires_grad_lora_emb_conv1d",
    "TestRequiresGrad::test_requires_grad_lora_same_targets",
    "TestRequiresGrad::test_requires_grad_modules_to_save_default",
    "TestRequiresGrad::test_requires_grad_modules_to_save_disabling",
    "TestRequiresGrad::test_requires_grad_modules_to_save_multiple_adapters",
)

# Tests of test_initialization.py that build LoRA models (found with --discover on peft 0.21.2: in an accelerated run of
# its 402 tests, 121 functions built one), with all their parametrizations. Left out: 6 that need scipy (not in the
# test extra: a kstest of the initial weights' distribution in test_lora_{linear,embedding,conv2d}_{default,gaussian}
# and its init_gaussian variants); those that need the Hub failed before building any model (OPT, Mamba, NemotronH and
# GPT-2 checkpoints: TestScaling, TestLowCpuMemUsage, TestNamingConflictWarning, TestLoadAdapterOfflineMode, ...).
INIT_TESTS = (
    "TestAdaLoraInitialization::test_adalora_default_init_identity",
    "TestCordaInitialization::test_lora_corda_alpha_pattern_and_rslora_raises",
    "TestCordaInitialization::test_lora_corda_conversion_same_output_after_loading",
    "TestCordaInitialization::test_lora_corda_conversion_same_output_after_loading_with_alpha_pattern",
    "TestCordaInitialization::test_lora_corda_conversion_same_output_after_loading_with_rank_pattern",
    "TestCordaInitialization::test_lora_corda_conversion_same_output_after_loading_with_rslora",
    "TestCordaInitialization::test_lora_corda_hooked_model_linear_init_default",
    "TestCordaInitialization::test_lora_corda_linear_init_default",
    "TestCordaInitialization::test_lora_corda_linear_init_default_with_rank_pattern",
    "TestCordaInitialization::test_lora_corda_no_redundant_fields",
    "TestCordaInitialization::test_lora_corda_rank_pattern_and_rslora_raises",
    "TestCustomModelConfigWarning::test_no_warning_by_default_custom_model",
    "TestCustomModelConfigWarning::test_warning_name_custom_model",
    "TestCustomModelConfigWarning::test_warning_name_custom_model_with_custom_name",
    "TestHotSwapping::test_hotswap_allowed_when_other_adapter_merged",
    "TestHotSwapping::test_hotswap_different_peft_types_raises",
    "TestHotSwapping::test_hotswap_extra_key_raises",
    "TestHotSwapping::test_hotswap_missing_key_works",
    "TestHotSwapping::test_hotswap_raises_when_target_adapter_merged",
    "TestHotSwapping::test_hotswap_works",
    "TestHotSwapping::test_hotswap_works_different_ranks_alphas",
    "TestHotSwapping::test_hotswap_works_different_ranks_alphas_conv2d",
    "TestHotSwapping::test_hotswap_works_different_ranks_conv2d_groups",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conserves_requires_grad",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conv2d_conserves_requires_grad",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conv2d_groups_rank_not_divisible_raises",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conv2d_groups_rank_padding_works",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conv2d_lora_bias",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_conv2d_rank_padding_works",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_does_not_change_output",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_does_not_change_output_conv2d",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_lora_bias",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_lower_rank_padding_raises",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_model_already_compiled_ignore",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_model_already_compiled_raises",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_model_already_compiled_warns",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_model_already_compiled_wrong_argument",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_rank_padding_works",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_same_rank_padding_works",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_scalings_are_tensors",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_scalings_update_config",
    "TestHotSwapping::test_prepare_model_for_compiled_hotswap_with_rank_pattern",
    "TestKasaInitialization::test_kasa_deferred_truncation_preserves_other_adapter_contributions",
    "TestKasaInitialization::test_kasa_deferred_truncation_with_bf16_base_and_fp32_adapter",
    "TestKasaInitialization::test_kasa_merge_before_forward_applies_deferred_truncation",
    "TestKasaInitialization::test_kasa_mixing_with_non_kasa_adapter_raises",
    "TestKasaInitialization::test_kasa_multiple_kasa_adapters_allowed",
    "TestKasaInitialization::test_kasa_reload_onto_original_base_retruncates",
    "TestKasaInitialization::test_kasa_truncation_changes_base_forward",
    "TestLoadPeftKeyMapping::test_key_mapping_save_new_load_new_lora",
    "TestLoadPeftKeyMapping::test_key_mapping_save_new_load_old_lora",
    "TestLoadPeftKeyMapping::test_key_mapping_save_old_load_new_lora",
    "TestLoadPeftKeyMapping::test_key_mapping_save_old_load_old_lora",
    "TestLoraInitialization::test_adding_multiple_adapters_with_different_target_parameters_raises",
    "TestLoraInitialization::test_adding_multiple_adapters_with_same_target_parameters_works",
    "TestLoraInitialization::test_error_raised_if_rank_not_divisible_by_groups",
    "TestLoraInitialization::test_loading_multiple_adapters_with_target_parameters_works",
    "TestLoraInitialization::test_lora_conv2d_false",
    "TestLoraInitialization::test_lora_conv2d_with_bias_when_base_layer_has_no_bias_warns",
    "TestLoraInitialization::test_lora_default_scaling_pattern",
    "TestLoraInitialization::test_lora_embedding_false",
    "TestLoraInitialization::test_lora_init_orthogonal",
    "TestLoraInitialization::test_lora_init_orthogonal_half_precision_dtype",
    "TestLoraInitialization::test_lora_linear_false",
    "TestLoraInitialization::test_lora_linear_with_bias_when_base_layer_has_no_bias_warns",
    "TestLoraInitialization::test_lora_mica_embedding_init_default",
    "TestLoraInitialization::test_lora_mica_freezes_B",
    "TestLoraInitialization::test_lora_mica_freezes_B_when_switching_adapters",
    "TestLoraInitialization::test_lora_mica_linear_init_default",
    "TestLoraInitialization::test_lora_mica_uses_minor_components",
    "TestLoraInitialization::test_lora_olora_linear_init_default",
    "TestLoraInitialization::test_lora_pissa_conversion_same_output_after_loading",
    "TestLoraInitialization::test_lora_pissa_conversion_same_output_after_loading_with_alpha_pattern",
    "TestLoraInitialization::test_lora_pissa_conversion_same_output_after_loading_with_rank_pattern",
    "TestLoraInitialization::test_lora_pissa_conversion_same_output_after_loading_with_rslora",
    "TestLoraInitialization::test_lora_pissa_linear_init_default",
    "TestLoraInitialization::test_lora_rslora_scaling",
    "TestLoraInitialization::test_lora_rslora_scaling_pattern",
    "TestLoraInitialization::test_lora_scaling_default",
    "TestLoraInitialization::test_lora_use_dora_linear",
    "TestLoraInitialization::test_lora_use_dora_linear_init_false",
    "TestLoraInitialization::test_lora_with_bias_argument",
    "TestLoraInitialization::test_lora_with_bias_extra_params",
    "TestLoraInitialization::test_matched_pattern_keys_do_not_warn",
    "TestLoraInitialization::test_mha_exposes_attributes",
    "TestLoraInitialization::test_mha_load_init_model_first",
    "TestLoraInitialization::test_mha_merge_masks_method",
    "TestLoraInitialization::test_misconfigured_second_adapter_warns_on_add_adapter",
    "TestLoraInitialization::test_multiple_configs_with_bias_raises",
    "TestLoraInitialization::test_olora_alpha_pattern_and_rslora_raises",
    "TestLoraInitialization::test_olora_conversion_same_output_after_loading",
    "TestLoraInitialization::test_olora_conversion_same_output_after_loading_with_alpha_pattern",
    "TestLoraInitialization::test_olora_conversion_same_output_after_loading_with_rank_pattern",
    "TestLoraInitialization::test_olora_conversion_same_output_after_loading_with_rslora",
    "TestLoraInitialization::test_olora_rank_pattern_and_rslora_raises",
    "TestLoraInitialization::test_partially_matched_pattern_warns_for_unmatched_keys_only",
    "TestLoraInitialization::test_pissa_alpha_pattern_and_rslora_raises",
    "TestLoraInitialization::test_pissa_rank_pattern_and_rslora_raises",
    "TestLoraInitialization::test_rank_alpha_pattern_override",
    "TestLoraInitialization::test_unmatched_alpha_pattern_key_warns",
    "TestLoraInitialization::test_unmatched_rank_pattern_key_warns",
    "TestLoraInitialization::test_valid_target_modules_invalid_target_parameters_warns",
    "TestLoraInitialization::test_valid_target_parameters_invalid_target_modules_warns",
    "TestWeightTying::test_alt_weight_tying_tied_model_lora",
    "TestWeightTying::test_alt_weight_tying_tied_model_target_modules_lora",
    "TestWeightTying::test_ensure_weight_tying_not_tying_when_model_config_tie_false",
    "TestWeightTying::test_ensure_weight_tying_not_tying_when_model_config_tie_false_target_modules",
    "TestWeightTying::test_weight_tying_enc_dec_modules_to_save_lora",
    "TestWeightTying::test_weight_tying_enc_dec_no_tied_module_targeted_warns",
    "TestWeightTying::test_weight_tying_enc_dec_target_modules_lora",
    "TestWeightTying::test_weight_tying_tied_model_lora",
    "TestWeightTying::test_weight_tying_tied_model_no_embed_lora",
    "TestWeightTying::test_weight_tying_tied_model_target_modules_all_linear_lora",
    "TestWeightTying::test_weight_tying_tied_model_target_modules_lora",
    "TestWeightTying::test_weight_tying_tied_model_target_modules_str_lora",
)
# Left out of --selection quick (kept in lora): torch.compile's first compile (~18 s) and CorDA's covariance passes
# (~15 s for the 20 tests).
INIT_NOT_QUICK = ("TestHotSwapping::test_hotswap_works", "TestCordaInitialization::")

# TestModelAndLayerStatus tests that need the Hub (transformers checkpoints) or a GPU; the rest build LoRA models.
STATUS_EXCLUDED = (
    "test_base_model_type_transformers_automodel", "test_transformers_model",
    "test_transformer_model_without_adapter_raises", "test_prefix_tuning", "test_adaption_prompt",
)

# (case name, model id) of the TEST_CASES entries kept by --selection quick (all test methods run on each).
SUBSET_CASES = (
    ("Vanilla MLP 1 LoRA", "MLP"),  # one nn.Linear target
    ("Vanilla MLP 4 LoRA", "MLP"),  # two targets
    ("Vanilla MLP 5 LoRA", "MLP"),  # modules_to_save
    ("Vanilla MLP 6 LoRA", "MLP"),  # lora_dropout=0.1, lora_alpha != r
    ("Vanilla MLP 8 LoRA with DoRA", "MLP"),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP"),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP"),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP"),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP"),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP"),
    ("BD-LoRA both A and B", "MLP"),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D"),  # transformers Conv1D (GPT-2's layer)
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D"),  # Embedding + Conv1D
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D"),
    ("Conv2d 2 LoRA", "Conv2d"),  # Conv2d + Linear in one model
    ("MHA 2 LoRA", "MHA"),  # nn.MultiheadAttention + Linear
    ("MLP 2 using nn.Parameter LoRA", "MLP"),  # target_parameters + target_modules
)

SELECTIONS = ("lora", "quick")
_CONFIG_TOKEN = re.compile(r"[A-Za-z0-9]*Config\b")


def selection_key(selection: str) -> str:
    """Hash of the rules, so that a cached id list is redone when they change."""
    rules = json.dumps([selection, LORA_TESTS, STATUS_EXCLUDED, INIT_TESTS,
                        [SUBSET_CASES, INIT_NOT_QUICK] if selection == "quick" else []])
    return hashlib.sha1(rules.encode()).hexdigest()[:10]


def select(ids: list[str], selection: str) -> list[str]:
    """The ids of ``selection`` among the collected ``ids`` (pytest node ids relative to the peft source root)."""
    lora_tests, init_tests = set(LORA_TESTS), set(INIT_TESTS)
    needles = [re.compile(r"[\[-]" + re.escape(f"{case}-{model}-LoraConfig-")) for case, model in SUBSET_CASES]
    chosen = []
    for nodeid in ids:
        path, _, rest = nodeid.partition("::")
        func, _, param = rest.partition("[")
        if any(token != "LoraConfig" for token in _CONFIG_TOKEN.findall(param)):
            continue  # another PEFT method's parametrization (AdaLoraConfig, TinyLoraConfig, ...)
        if nodeid.startswith(STATUS + "::"):
            if func.split("::")[-1] not in STATUS_EXCLUDED:
                chosen.append(nodeid)
        elif path == INIT:
            if func in init_tests and (selection == "lora" or not func.startswith(INIT_NOT_QUICK)):
                chosen.append(nodeid)
        elif path != CUSTOM:
            continue
        elif "-LoraConfig-" in param:
            if selection == "lora" or any(n.search("[" + param) for n in needles):
                chosen.append(nodeid)
        elif func in lora_tests:
            chosen.append(nodeid)
    return chosen


# -- the PEFT sources ---------------------------------------------------------------------------------------------

PYTEST_INI = """\
# Written by bench/peft_suite.py. PEFT's own pyproject.toml is not used: its addopts need pytest-cov.
[pytest]
markers =
    regression: PEFT regression tests
    single_gpu_tests: tests that run on a single GPU
    multi_gpu_tests: tests that run on multiple GPUs
    bitsandbytes: bitsandbytes integration tests
"""


def fetch_tests(cache: Path, version: str, sdist: Path | None) -> Path:
    """``<cache>/peft-<version>`` holding PEFT's tests/ folder and a pytest.ini; downloaded once."""
    root = cache / f"peft-{version}"
    if (root / CUSTOM).is_file() and (root / "pytest.ini").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        if sdist is None:
            print(f"peft_suite: downloading the peft {version} source archive into {cache}", flush=True)
            cmd = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps",
                   "--disable-pip-version-check", "-q", "-d", str(tmp / "dl")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = sorted((tmp / "dl").glob("peft-*.tar.gz")) if done.returncode == 0 else []
            if not archives:
                sys.exit(f"peft_suite: `{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}\n"
                         "Without the package index, pass the archive: --sdist peft-<version>.tar.gz")
            sdist = archives[0]
        prefix = f"peft-{version}/tests/"
        staged = tmp / "root"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            for m in members:
                target = (staged / m.name[len(f"peft-{version}/"):]).resolve()
                if not str(target).startswith(str(staged.resolve()) + os.sep):
                    sys.exit(f"peft_suite: unsafe path in {sdist}: {m.name}")
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not (staged / CUSTOM).is_file():
            sys.exit(f"peft_suite: {sdist} has no {prefix}test_custom_models.py")
        # PEFT's repository has tests/__init__.py (the modules import each other relatively); its sdist does not.
        (staged / "tests" / "__init__.py").touch()
        (staged / "pytest.ini").write_text(PYTEST_INI)
        (staged / "SOURCE").write_text(f"peft {version} tests, from {sdist.name}\n")
        if root.exists():
            shutil.rmtree(root)
        staged.rename(root)
    return root


# -- running pytest -----------------------------------------------------------------------------------------------

def _shim(cache: Path) -> Path | None:
    """A folder to put first on PYTHONPATH when fused_lora is not installed (the lent GPU machines): the repository
    root, whose ``fused_lora/__init__.py`` registers the top-level ``kernels/`` folder as ``fused_lora.kernels`` (the
    folder has no ``__init__.py``, so it cannot shadow HF's ``kernels`` package)."""
    spec = importlib.util.find_spec("fused_lora")
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO / "fused_lora"):
        return None  # installed (editable) from this checkout
    return REPO


def child_env(cache: Path, accelerate: bool, backend: str) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(BENCH)]
    shim = _shim(cache)
    if shim is not None:
        paths.insert(0, str(shim))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # see the module docstring
    for name in ("FUSED_LORA_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    if accelerate and backend != "auto":
        env["FUSED_LORA_BACKEND"] = backend
        if backend == "triton" and not _has_cuda():
            env["TRITON_INTERPRET"] = "1"  # read when the kernels' module is imported: set before the child starts
    return env


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_cmd(root: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"), "--rootdir", str(root),
            "--confcutdir", str(root), "-p", "no:cacheprovider", "-p", PLUGIN, *args]


def collect(root: Path, cache: Path, out: Path) -> list[str]:
    log = out / "collect.log"
    cmd = pytest_cmd(root, ["--collect-only", "-q", CUSTOM, STATUS, INIT])
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=root, env=child_env(cache, False, "auto"), stdout=f, stderr=subprocess.STDOUT,
                            text=True).returncode
    ids = []
    for line in log.read_text().splitlines():  # `-q --collect-only`: one id a line, then a blank line, then the rest
        if not line.strip():
            break
        if "::" in line:
            ids.append(line.strip())
    if rc != 0 or not ids:
        sys.exit(f"peft_suite: collecting PEFT's tests failed (pytest exit {rc}); see {log}")
    return ids


def resolve(root: Path, cache: Path, out: Path, selection: str) -> list[str]:
    """The selected ids; resolved by one --collect-only run, then cached beside the tests."""
    cached = root / f"selection-{selection}-{selection_key(selection)}.txt"
    if cached.is_file():
        return cached.read_text().splitlines()
    ids = select(collect(root, cache, out), selection)
    if selection == "quick":
        for case, model in SUBSET_CASES:
            if not any(f"{case}-{model}-LoraConfig-" in i for i in ids):
                print(f"peft_suite: warning: SUBSET_CASES entry {case!r} ({model}) matches no test", flush=True)
    cached.write_text("\n".join(ids) + "\n")
    return ids


def run_pass(name: str, root: Path, cache: Path, out: Path, ids: list[str], accelerate: bool, backend: str,
             extra: list[str], via: str = "accelerate") -> dict:
    args_file = out / f"{name}.args"
    args_file.write_text("\n".join(ids) + "\n")  # pytest reads arguments from @file (ids hold spaces and brackets)
    result_json = out / f"{name}.json"
    args = ["-q", "--tb=short", "--peft-suite-json", str(result_json), *extra, f"@{args_file}"]
    if accelerate:
        args.insert(0, "--fused-enable" if via == "enable" else "--fused-accelerate")
    log = out / f"{name}.log"
    env = child_env(cache, accelerate, backend)
    tag = f" FUSED_LORA_BACKEND={env['FUSED_LORA_BACKEND']}" if "FUSED_LORA_BACKEND" in env else ""
    tag += " TRITON_INTERPRET=1" if env.get("TRITON_INTERPRET") else ""
    print(f"peft_suite: {name} pass, {len(ids)} tests{tag} ...", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(pytest_cmd(root, args), cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
    print(f"peft_suite: {name} pass done in {seconds:.0f} s (pytest exit {rc}): {tail[0] if tail else ''}", flush=True)
    if rc not in (0, 1) or not result_json.is_file():
        sys.exit(f"peft_suite: the {name} pass did not complete (pytest exit {rc}); see {log}")
    result = json.loads(result_json.read_text())
    result["wall_seconds"] = round(seconds, 1)
    result["ids"] = ids
    return result


# -- comparing ----------------------------------------------------------------------------------------------------

BAD = ("failed", "error", "missing")

# Tests (Class::method) whose accelerated outcome differs from PEFT's on purpose, with the failure message that shows
# it (and nothing else) happened: not regressions, listed in the summary. PEFT refuses adapter_names= in training mode;
# a model fused_lora serves trains with it (fused_lora/peft_mixed.py), so PEFT's check that it raises does not raise.
INTENDED = {
    "TestMixedAdapterBatches::test_mixed_adapter_batches_training_mode_raises": (
        "DID NOT RAISE", "fused_lora.peft serves adapter_names= in training mode (PEFT refuses it)"),
}


def intended(nodeid: str, test: dict) -> str | None:
    """Why ``test``'s outcome in an accelerated pass differs from PEFT's on purpose, or None."""
    found = INTENDED.get(nodeid.split("::", 1)[-1].partition("[")[0])
    if found is None or test["outcome"] != "failed" or found[0] not in test.get("message", ""):
        return None
    return found[1]


def regressions(plain: dict, accel: dict) -> list[tuple[str, str, str]]:
    """(id, outcome, first error line) of the tests given to ``accel`` that pass plain and fail, error or are missing
    (a crash) there, except the :data:`INTENDED` differences."""
    out = []
    for nodeid in accel["ids"]:
        if plain["tests"].get(nodeid, {}).get("outcome") != "passed":
            continue
        other = accel["tests"].get(nodeid, {"outcome": "missing", "message": "not run in this pass"})
        if other["outcome"] in BAD and intended(nodeid, other) is None:
            out.append((nodeid, other["outcome"], other["message"]))
    return out


def summary(passes: dict[str, dict], regs: dict[str, list], selection: str, n_ids: int, version: str) -> str:
    via = next((res["via"] for res in passes.values() if res.get("via")), "accelerate")
    lines = [f"## PEFT {version} LoRA tests through fused_lora.peft.{via} ({selection}: {n_ids} tests)", "",
             "| pass | passed | failed | error | skipped | other | seconds | swapped layers | fused calls "
             "| tests with fused calls |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in passes.items():
        t = res["totals"]
        other = sum(v for k, v in t.items() if k not in ("passed", "failed", "error", "skipped"))
        accel = res["mode"] == "accelerated"
        lines.append(f"| {name} | {t.get('passed', 0)} | {t.get('failed', 0)} | {t.get('error', 0)} "
                     f"| {t.get('skipped', 0)} | {other} | {res['wall_seconds']:.0f} "
                     f"| {res['swapped_layers'] if accel else '-'} | {res['fused_calls'] if accel else '-'} "
                     f"| {res['tests_with_fused_calls'] if accel else '-'} |")
    plain = passes["plain"]["tests"]
    not_passing = sum(1 for t in plain.values() if t["outcome"] != "passed")
    lines += ["", f"{not_passing} tests do not pass plain (skipped, or failing without fused_lora): not compared."]
    stubbed = passes["plain"].get("stubbed_modules")
    if stubbed:
        lines.append(f"Placeholder modules (not installed; bench/peft_suite_plugin.py): {', '.join(stubbed)}.")
    for name, res in passes.items():
        if res["mode"] == "accelerated":
            lines += ["", *fused_path_report(name, res)]
    for name, res in passes.items():
        differs = [(nodeid, why) for nodeid, test in res["tests"].items()
                   if name != "plain" and (why := intended(nodeid, test)) is not None]
        if differs:
            lines += ["", f"### Intended differences in the {name} pass: {len(differs)}", ""]
            lines += [f"- `{nodeid.split('::', 1)[1]}`: {why}" for nodeid, why in differs]
    for name, found in regs.items():
        lines += ["", f"### Regressions in the {name} pass: {len(found)} (pass plain, fail or error {name})", ""]
        for nodeid, outcome, message in found:
            lines.append(f"- `{nodeid.split('::', 1)[1]}` ({outcome}): {message[:300]}")
    return "\n".join(lines) + "\n"


def fused_path_report(name: str, res: dict) -> list[str]:
    """Per test file: the tests that built LoRA models, those where the fused Function ran, and why layers kept
    PEFT's forward (the reasons fused_lora.peft gave, with the number of tests that met each)."""
    lines = [f"### Fused path in the {name} pass", "", "| file | tests | built LoRA models | ran the fused Function |",
             "|---|---|---|---|"]
    by_file: dict[str, list[int]] = {}
    for nodeid, test in res["tests"].items():
        counts = by_file.setdefault(nodeid.partition("::")[0], [0, 0, 0])
        counts[0] += 1
        counts[1] += bool(test["lora_models"])
        counts[2] += bool(test["fused_calls"])
    lines += [f"| {path} | {n} | {lora} | {fused} |" for path, (n, lora, fused) in sorted(by_file.items())]
    reasons = res.get("fallback_reasons", {})
    if reasons:
        lines += ["", "| fallback reason (PEFT's forward kept) | tests |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in reasons.items()]
    return lines


def discover(root: Path, cache: Path, out: Path) -> int:
    """Runs, accelerated, every test_custom_models.py test that is not parametrized by a TEST_CASES entry nor by
    another PEFT method, and every test_initialization.py test not parametrized for another method, and prints the
    Class::method names that built a LoRA model (the LORA_TESTS and INIT_TESTS surveys)."""
    ids = collect(root, cache, out)
    lora_only = [i for i in ids if all(t == "LoraConfig" for t in _CONFIG_TOKEN.findall(i.partition("[")[2]))]
    pools = {"LORA_TESTS": [i for i in lora_only if i.startswith(CUSTOM + "::") and "Config-" not in i],
             "INIT_TESTS": [i for i in lora_only if i.startswith(INIT + "::")]}
    res = run_pass("discover", root, cache, out, [i for pool in pools.values() for i in pool], True, "auto", [])
    for name, pool in pools.items():
        found, hub, other = set(), set(), set()
        for nodeid in pool:
            test = res["tests"].get(nodeid, {"lora_models": 0, "message": "", "outcome": "missing"})
            func = nodeid.split("::", 1)[1].partition("[")[0]
            if test["lora_models"]:
                (other if test["outcome"] in BAD and "placeholder" in test["message"] else found).add(func)
            elif "huggingface.co" in test["message"]:
                hub.add(func)
        print(f"{name} = (\n" + "".join(f'    "{f}",\n' for f in sorted(found - other)) + ")")
        print("needing the Hub (not selectable offline): " + ", ".join(sorted(hub)))
        if other:
            print("needing a module that is not installed (placeholder): " + ", ".join(sorted(other)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selection", choices=SELECTIONS, default="lora", help="lora (all, default) or quick")
    ap.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                    help="FUSED_LORA_BACKEND of the accelerated pass; triton adds a third pass through the kernels "
                         "(Triton's interpreter on CPU) over the tests in which the fused Function ran")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "peft-suite", help="PEFT sources and runs")
    ap.add_argument("--sdist", type=Path, help="use this peft source archive instead of downloading it")
    ap.add_argument("--out", type=Path, help="folder for logs and JSON (default: <cache>/runs/<time>)")
    ap.add_argument("--list", action="store_true", help="print the selected test ids and exit")
    ap.add_argument("--discover", action="store_true", help="survey which tests build LoRA models (for LORA_TESTS)")
    ap.add_argument("--pytest-arg", action="append", default=[], help="extra argument for both pytest runs")
    ap.add_argument("--via", choices=("accelerate", "enable"), default="accelerate",
                    help="how the accelerated pass reaches the fused path: accelerate (PEFT's entry points patched to "
                         "call fused_lora.peft.accelerate on what they return) or enable (fused_lora.peft.enable())")
    args = ap.parse_args(argv)

    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("peft_suite: peft is not installed")
    cache = args.cache.resolve()
    root = fetch_tests(cache, version, args.sdist)
    out = (args.out or cache / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.discover:
        return discover(root, cache, out)
    ids = resolve(root, cache, out, args.selection)
    if args.list:
        print("\n".join(ids))
        return 0
    if not ids:
        sys.exit("peft_suite: the selection is empty")

    backend = "auto" if args.backend == "triton" else args.backend
    passes = {"plain": run_pass("plain", root, cache, out, ids, False, "auto", args.pytest_arg)}
    passes["accelerated"] = run_pass("accelerated", root, cache, out, ids, True, backend, args.pytest_arg, args.via)
    if args.backend == "triton":
        fused = [i for i in ids if passes["accelerated"]["tests"].get(i, {}).get("fused_calls")]
        passes["triton"] = run_pass("triton", root, cache, out, fused, True, "triton", args.pytest_arg, args.via)
    regs = {name: regressions(passes["plain"], res) for name, res in passes.items() if name != "plain"}

    text = summary(passes, regs, args.selection, len(ids), version)
    (out / "summary.md").write_text(text)
    print("\n" + text + f"\nlogs and JSON: {out}")
    ineffective = [name for name, res in passes.items()
                   if name != "plain" and (not res["swapped_layers"] or not res["fused_calls"])]
    if ineffective:
        print(f"peft_suite: the {', '.join(ineffective)} pass swapped no layer or never called the fused Function: "
              "the patch did not take effect", file=sys.stderr)
        return 2
    return 1 if any(regs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
