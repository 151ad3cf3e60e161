"""evaluate.device: every variant is measured on the device it names; `cuda` without CUDA is refused by key."""

import numpy as np
import pytest
import torch
from small_inputs import train_test_tokenizer

from llmpipe.errors import ParamError
from llmpipe.eval.compare import (
    EvaluateSettings,
    Variant,
    evaluation_device,
    measure_variant,
)
from llmpipe.eval.metrics import language_model_loss
from llmpipe.model.transformer import ModelConfig, Transformer
from llmpipe.text.chat_template import ChatTemplate


def test_cpu_and_auto_without_cuda_measure_on_the_cpu_and_cuda_is_refused_naming_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert evaluation_device(EvaluateSettings(device="cpu"), "params.yaml") == torch.device("cpu")
    assert evaluation_device(EvaluateSettings(device="auto"), "params.yaml") == torch.device("cpu")
    with pytest.raises(ParamError) as error:
        evaluation_device(EvaluateSettings(device="cuda"), "params.yaml")
    assert str(error.value).startswith("params.yaml: evaluate.device: cuda, but this PyTorch sees no CUDA device")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_variant_is_measured_on_the_device_with_the_cpus_numbers(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tokenizer = train_test_tokenizer(tmp_path / "tokenizer", 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_layer=1, d_model=64,
                                    n_head=2, n_kv_head=1, ffn_hidden=64))
    weights = tmp_path / "weights"
    weights.write_bytes(b"0" * 10)
    loaded_on = []

    def load():  # the variant's model, read on the CPU as the stage reads it
        loaded_on.append(model)
        return model

    tokens = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 200).astype(np.uint16)
    qa_sets = {"heldout_people": [{"question": "Where does Ann live?", "answer": "Paris", "attribute": "city"}]}
    limits = EvaluateSettings(eval_max_tokens=128, kl_max_tokens=64, max_new_tokens=3, generation_tokens=4,
                              device=device)
    expected_loss, _ = language_model_loss(model, tokens, 128, 16)
    row, answers, log_probs = measure_variant(Variant("m", load, weights, 32.0), ChatTemplate(tokenizer), tokens,
                                              {"tokens": 200, "utf8_bytes": 800}, qa_sets, [1, 2, 3], limits,
                                              torch.device(device))
    assert loaded_on[0].embed_tokens.weight.device.type == device
    assert row["val_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert log_probs.device.type == "cpu" and log_probs.shape == (64, tokenizer.vocab_size)
    assert len(answers["heldout_people"]) == 1 and row["tokens_per_second"] > 0
