"""The examples' fast paths, so that none of them rots.

examples/ is not a package: each script is loaded from its file (each puts examples/ on sys.path itself for
the shared sentiment_data module). Every script's ``main(argv)`` returns its metrics.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FAST = ["--no-progress"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpt2_example():
    return load("finetune_gpt2_classification")


@pytest.fixture(scope="module")
def data():
    load("finetune_gpt2_classification")  # puts examples/ on sys.path
    import sentiment_data

    return sentiment_data


def test_synthetic_task_is_deterministic_balanced_and_covered_by_the_tokenizer(data):
    train, test = data.synthetic_sentiment(400, 100, seed=3)
    assert (train, test) == data.synthetic_sentiment(400, 100, seed=3)
    assert train != data.synthetic_sentiment(400, 100, seed=4)[0]
    assert sum(label for _, label in train) == 200 and sum(label for _, label in test) == 50
    tokenizer = data.word_tokenizer(data.synthetic_vocabulary())
    ids = tokenizer([text for text, _ in train + test])["input_ids"]
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    # The documented rules, re-derived from the text alone: "not" (before an optional adverb) flips the opinion
    # word, the clause after "but" decides, otherwise the majority.
    for text, label in train:
        words = text.split()
        opinions = []
        for i, word in enumerate(words):
            if word in data.POSITIVE or word in data.NEGATIVE:
                sign = 1 if word in data.POSITIVE else -1
                opinions.append(-sign if "not" in words[max(0, i - 2):i] else sign)
        score = opinions[-1] if "but" in words else sum(opinions)
        assert score != 0 and int(score > 0) == label, text


def test_gpt2_default_run_learns(gpt2_example):
    """The main job, exactly as `python examples/finetune_gpt2_classification.py` runs it on CPU."""
    result = gpt2_example.main(FAST)
    assert result["steps"] == 10 * 63
    assert 0.35 < result["accuracy_before"] < 0.65
    # Measured on 2 CPU cores: 0.924 with the default seed 0 (0.876-0.924 over seeds 0-2); chance is 0.5. The
    # margin covers other CPUs' rounding, which perturbs the run about as much as a change of seed.
    assert result["accuracy"] > 0.8, result["accuracies"]
    assert result["step_time_ms"] > 0 and result["peak_memory_mib"] > 0
    assert all(math.isfinite(loss) for loss in result["losses"])


def test_gpt2_local_checkpoint_and_adapter_that_peft_reads(gpt2_example, data, tmp_path):
    """`--model PATH` with a save_pretrained folder (model + tokenizer), then `--save-adapter`, which PEFT loads."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    peft = pytest.importorskip("peft")
    tokenizer = data.word_tokenizer(data.synthetic_vocabulary())
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=64, num_labels=2,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")

    # On CPU in fp32 whatever the machine: the outputs are compared with a PEFT model built here, on CPU.
    result = gpt2_example.main([*FAST, "--device", "cpu", "--model", str(tmp_path / "ckpt"), "--steps", "3",
                                "--epochs", "1", "--train-size", "96", "--test-size", "32", "--bias", "lora_only",
                                "--save-adapter", str(tmp_path / "adapter")])
    assert result["steps"] == 3
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}

    model = result["model"].eval()
    reloaded = peft.PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(tmp_path / "ckpt"),
                                              tmp_path / "adapter").eval()
    batch = result["tokenizer"](["the plot was not dull .", "a bland film ."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_bf16_mixed_precision_keeps_trainables_fp32(gpt2_example):
    """The GPU default (--dtype auto on CUDA is bfloat16), exercised on CPU autocast."""
    result = gpt2_example.main([*FAST, "--dtype", "bfloat16", "--device", "cpu", "--steps", "4", "--epochs", "1",
                                "--train-size", "128", "--test-size", "32"])
    model = result["model"]
    assert result["steps"] == 4 and all(math.isfinite(loss) for loss in result["losses"])
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16  # frozen base stored in bf16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_gpt2_sst2_without_datasets_is_a_clear_error(gpt2_example):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("datasets is installed (the test would download SST-2)")
    with pytest.raises(SystemExit, match="pip install datasets"):
        gpt2_example.main([*FAST, "--dataset", "sst2"])


def test_gpt2_sst2_path_with_a_stand_in_for_datasets(gpt2_example, monkeypatch):
    """--dataset sst2 with the tiny model (a word tokenizer built from the corpus), offline: a stand-in
    `datasets` module serves GLUE SST-2's layout (train / validation splits of sentence + label)."""
    import types

    class Split(list):
        def select(self, indices):
            return Split(self[i] for i in indices)

    words = ["a", "gorgeous", "witty", "dreary", "film", "the", "story", "is", "dull", "lovely"]
    rows = [{"sentence": " ".join(words[(i * k) % len(words)] for k in range(1, 6)), "label": i % 2}
            for i in range(80)]
    calls = []

    def load_dataset(*args):
        calls.append(args)
        return {"train": Split(rows[:64]), "validation": Split(rows[64:]), "test": Split()}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = gpt2_example.main([*FAST, "--dataset", "sst2", "--steps", "2", "--train-size", "48"])
    assert calls == [("glue", "sst2")]
    assert result["steps"] == 2 and len(result["tokenizer"]) == 2 + len(words)  # [PAD], [UNK] + the corpus


def test_gemma2_custom_head_trains_in_full_with_lora_on_attention_only():
    example = load("gemma2_classification_custom_head")
    result = example.main(FAST)  # the default run: 189 steps, ~7 s on 2 CPU cores
    assert result["adapted"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert result["head_trainable"] and result["head_changed"]
    # Measured: 0.908 with the default seed 0 (0.854-0.912 over seeds 0-2); chance is 0.5.
    assert result["accuracy"] > 0.8, result["accuracies"]


def test_gemma2_quantized_head_error_is_clear():
    example = load("gemma2_classification_custom_head")
    result = example.main(["--show-quantized-error"])
    error = result["error"]
    assert "score" in error and "int8" in error and "modules_to_save" in error
    assert "floating point" in error and "llm_int8_skip_modules" in error  # says what to do
    assert "only Tensors of floating point" in result["torch_error"]  # the bare error it replaces
    assert result["model_untouched"]


def test_compare_with_peft_same_run_same_outputs(tmp_path):
    example = load("compare_with_peft")
    # matplotlib comes with the `examples` and `bench` extras; without it the comparison is still tested.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    png = tmp_path / "curves.png"
    result = example.main(["--steps", "15", "--plot", str(png) if has_matplotlib else ""])
    # On CPU the fused layer's PyTorch path does PEFT's arithmetic in PEFT's order: measured 0.0 exactly. On a
    # GPU the Triton kernels sum in another order (fp32, no TF32 by default), which 15 AdamW steps may amplify.
    tol = 1e-3 if torch.cuda.is_available() else 1e-4
    assert result["initial_max_abs_diff"] < 1e-5
    assert result["max_abs_diff"] < tol, result["max_abs_diff"]
    assert result["max_loss_diff"] < tol
    assert len(result["losses"]["PEFT"]) == len(result["losses"]["fused-lora"]) == 15
    if has_matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_with_peft_dropout_saves_less_for_backward(tmp_path):
    """With dropout PEFT keeps a dropped copy of x and the mask per adapted layer; fused-lora keeps neither."""
    example = load("compare_with_peft")
    result = example.main(["--steps", "2", "--dropout", "0.1", "--targets", "c_attn,c_fc", "--plot", ""])
    saved = result["saved_mib"]
    assert saved["fused-lora"] < saved["PEFT"], saved


def test_gemma2_qlora_fast_path(tmp_path):
    """The QLoRA example's mechanics: a Gemma2 checkpoint loaded in 4 bits through from_pretrained, fused LoRA on
    the 8 attention projections of its 4-bit layers, the custom head trained. The default run (189 steps, measured
    0.83 test accuracy with seed 0; chance 0.5) is too long for CI: 20 steps here."""
    pytest.importorskip("bitsandbytes")
    example = load("gemma2_qlora_classification")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    png = tmp_path / "loss.png"
    result = example.main(["--no-progress", "--epochs", "1", "--steps", "20", "--train-size", "640",
                           "--test-size", "128", "--plot", str(png) if has_matplotlib else ""])
    assert result["quantized_layers"] == 8 and result["steps"] == 20
    assert all(math.isfinite(v) for v in result["losses"]) and 0.0 <= result["accuracy"] <= 1.0
    q_proj = result["model"].model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q_proj.lora_B) > 0  # B starts at zero: the adapters trained
    if has_matplotlib:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verbose_prints_what_was_timed_chosen_and_verified(gpt2_example, monkeypatch, capsys):
    """--verbose: the path report, here for the Triton kernels under the interpreter with the check on."""
    import fused_lora
    from fused_lora import diagnostics

    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    diagnostics.clear()
    fused_lora.set_verify("first")
    try:
        gpt2_example.main([*FAST, "--device", "cpu", "--steps", "1", "--epochs", "1", "--train-size", "8",
                           "--test-size", "8", "--batch-size", "4", "--max-length", "16", "--verbose"])
    finally:
        fused_lora.set_verify(None)
        diagnostics.clear()
    out = capsys.readouterr().out
    assert "paths per key" in out and "chosen" in out
    assert "fused forward pass" in out and "fused backward pass" in out and "FAIL" not in out


@pytest.fixture(scope="module")
def sweep_example():
    return load("sweep_rank")


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_sweep_rank_concurrent_equals_sequential_and_peft_loads_each_adapter(sweep_example, tmp_path):
    """The rank sweep (r = 1, 2, 4, 8, 16) trained concurrently equals the same sweep run one adapter at a time, with
    dropout (each adapter's masks drawn from the same seeds both ways) and without (each adapter alone in its model);
    PeftModel.from_pretrained loads each saved adapter alone onto the saved base and gives the fused model's outputs
    with that adapter (the fp64 rule, against the PEFT model in float64)."""
    from helpers import CUDA, assert_within_torch_error, atol_for, max_err
    from transformers import OPTForCausalLM

    peft = pytest.importorskip("peft")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    plot = ["--plot", str(tmp_path / "curves.png")] if has_matplotlib else ["--curves", str(tmp_path / "c.json")]
    runs = {}
    for dropout in ("0.1", "0.0"):
        for mode in ("concurrent", "sequential"):
            extra = ["--sequential"] if mode == "sequential" else plot if dropout == "0.1" else []
            runs[mode, dropout] = sweep_example.main(["--fast", "--dropout", dropout, "--out",
                                                      str(tmp_path / f"{mode}-{dropout}"), *extra])
    ranks = [1, 2, 4, 8, 16]
    concurrent = runs["concurrent", "0.1"]
    assert concurrent["names"] == [f"r{r}" for r in ranks]
    assert concurrent["counts_350m"] == {r: 98304 * r for r in ranks}
    if has_matplotlib:
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert set(json.loads((tmp_path / "c.json").read_text())["train_loss"]) == set(concurrent["names"])
    for run in runs.values():
        assert run["finite"] and all(len(v) == 12 for v in run["losses"].values())
    # Dropout is on in the first sweep: its losses are not those of the sweep without it.
    assert concurrent["losses"]["r4"] != runs["concurrent", "0.0"]["losses"]["r4"]
    # Every adapter learned, and rank matters (measured final training loss 4.49 at r=1, 3.99 at r=16; start 4.6).
    final = {r: concurrent["final"][f"r{r}"]["train_loss"] for r in ranks}
    assert all(final[r] < concurrent["losses"][f"r{r}"][0] for r in ranks) and final[16] < final[1] - 0.1, final

    # Concurrent = sequential. The fused layer has no float64 path (no fp64 run to judge by), so a stated tolerance:
    # on CPU the PyTorch path gives the same bits both ways (measured: difference 0.0, with and without dropout); the
    # tolerance leaves room for a BLAS that blocks the concurrent run's 5x taller matrices differently. On a GPU the
    # kernels' sums may run in another order for 5x the rows, which 12 AdamW steps at lr 1e-2 may amplify (untested
    # there: no GPU when this was written).
    rtol, atol = (1e-3, 1e-4) if CUDA else (1e-5, 1e-6)
    for dropout in ("0.1", "0.0"):
        for r in ranks:
            got = adapter_tensors(tmp_path / f"concurrent-{dropout}" / f"r{r}")
            alone = adapter_tensors(tmp_path / f"sequential-{dropout}" / f"r{r}")
            assert got.keys() == alone.keys() and len(got) == 8  # lora_A, lora_B of q_proj and v_proj, 2 layers
            for key in got:
                assert got[key].shape[0 if "lora_A" in key else 1] == r, (key, got[key].shape)
                torch.testing.assert_close(got[key], alone[key], rtol=rtol, atol=atol,
                                           msg=lambda m, r=r, key=key, d=dropout: f"r{r} {key} (dropout {d}): {m}")

    # PEFT loads each adapter alone onto the saved base; the same outputs as the fused model with that adapter.
    model = concurrent["model"].eval()
    device = next(model.parameters()).device
    tokenizer = concurrent["tokenizer"]
    batch = tokenizer(["review : the plot was not dull . verdict : positive", "review : a bland film . verdict :"],
                      padding=True, return_tensors="pt").to(device)
    base_dir = tmp_path / "concurrent-0.1" / "base"
    with torch.no_grad():
        base_logits = OPTForCausalLM.from_pretrained(base_dir).to(device)(**batch).logits
        for r in ranks:
            loaded = peft.PeftModel.from_pretrained(OPTForCausalLM.from_pretrained(base_dir),
                                                    tmp_path / "concurrent-0.1" / f"r{r}").to(device).eval()
            reference = copy.deepcopy(loaded).double()(**batch).logits
            with sweep_example.use_adapters(model, [f"r{r}"] * 2):
                fused = model(**batch).logits
            assert max_err(loaded(**batch).logits, base_logits) > 1e-3  # the adapter changes the outputs
            assert_within_torch_error(f"r{r} logits", fused, loaded(**batch).logits, reference,
                                      atol_for(torch.float32, reference.abs().max().item()))


def test_sweep_rank_opt_350m_count_check_fails_loudly(sweep_example, monkeypatch):
    """The OPT-350m check: the injected model's count per adapter against 98304·r, and 98304 against the config's
    2 modules × 24 layers × (1024 + 1024); either mismatch is an error that says what it found."""
    assert sweep_example.check_opt_350m_counts([3]) == {3: 3 * 98304}
    groups = sweep_example.adapter_param_groups
    # As if the injection had missed one module (the last layer's v_proj B, 1024 × r).
    monkeypatch.setattr(sweep_example, "adapter_param_groups",
                        lambda model: [dict(g, params=g["params"][:-1]) for g in groups(model)])
    with pytest.raises(AssertionError, match=r"expected 98304·r .* got \{1: 97280, 4: 389120\}"):
        sweep_example.check_opt_350m_counts([1, 4])
    monkeypatch.setattr(sweep_example, "OPT_350M_PER_RANK", 98305)
    with pytest.raises(AssertionError, match=r"2 modules × 24 layers × \(2 × 1024\) = 98304 per rank, not 98305"):
        sweep_example.check_opt_350m_counts([1])
