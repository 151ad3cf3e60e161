"""Weights keep their own precision: a bf16 model is read, held, fine-tuned and written in bf16; what trains (LoRA
adapters, chat-token rows, every weight of a full fine-tune) is held in fp32; anything else stored (float64) is
read as fp32, as before."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from llmpipe.errors import InputDataError
from llmpipe.model.lora import LoRALinear, add_lora, merge_lora
from llmpipe.model.transformer import ModelConfig, Transformer
from llmpipe.model.weights import cast_weights, load_model, read_checked_tensors, stored_dtype, write_model
from llmpipe.train.chat_tokens import train_only_token_rows
from llmpipe.train.finetune_settings import LoRASettings


def bf16_model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, context_length=16, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=48)
    return cast_weights(Transformer(config), torch.bfloat16)


def test_a_bf16_model_is_written_and_read_back_in_bf16_unless_another_dtype_is_asked(tmp_path):
    model = bf16_model()
    write_model(tmp_path, model)
    assert stored_dtype([tmp_path / "model.safetensors"]) == torch.bfloat16
    loaded, _ = load_model(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and loaded.rope_cos.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    as_fp32, _ = load_model(tmp_path, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    tokens = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert loaded(tokens)[0].dtype == torch.bfloat16
        torch.testing.assert_close(as_fp32(tokens)[0], loaded.float()(tokens)[0])


def test_stored_dtypes_the_model_does_not_compute_in_are_read_as_fp32_and_checked_there(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4, dtype=torch.float64), "b": torch.ones(2, dtype=torch.bfloat16),
               "ids": torch.arange(3)}, str(path))
    assert stored_dtype([path]) == torch.float32  # float64 holds most elements
    state = read_checked_tensors(path)
    assert (state["a"].dtype, state["b"].dtype, state["ids"].dtype) == (torch.float32, torch.bfloat16, torch.int64)
    save_file({"a": torch.tensor([1e300], dtype=torch.float64)}, str(path))
    with pytest.raises(InputDataError, match="tensor a holds NaN or infinite values in float32 .the file stores float64"):
        read_checked_tensors(path)


def test_lora_trains_fp32_adapters_over_frozen_bf16_weights_and_merges_into_bf16():
    model = bf16_model()
    frozen = model.layers[0].self_attn.q_proj.weight.clone()
    add_lora(model, LoRASettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj")))
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    tokens = torch.randint(0, 64, (2, 16))
    _, loss = model(tokens, tokens)
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    expected = (frozen.float() + layer.scaling * (layer.lora_B @ layer.lora_A)).to(torch.bfloat16)
    merge_lora(model)
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.layers[0].self_attn.q_proj.weight, expected, atol=0, rtol=0)


def test_chat_token_rows_train_in_fp32_while_the_blocks_stay_bf16():
    model = bf16_model()
    names = train_only_token_rows(model, [5, 7])
    assert "embed_tokens.weight" in names  # and lm_head.weight, unless tied to it
    assert model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.float32
    assert model.dtype == torch.bfloat16 and model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 64, (2, 16))
    _, loss = model(tokens, tokens)
    loss.backward()
    gradient = model.embed_tokens.weight.grad
    assert gradient.dtype == torch.float32 and set(gradient.abs().sum(-1).nonzero().flatten().tolist()) <= {5, 7}
    logits, _ = model(tokens)  # and it decodes
    assert logits.dtype == torch.float32


def train_adapters(model: Transformer, base_bits: int, steps: int = 30) -> list[float]:
    torch.manual_seed(1)
    add_lora(model, LoRASettings(rank=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj"),
                                 base_bits=base_bits))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        _, loss = model(tokens, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_trains_the_same_adapters_over_an_nf4_base_and_merges_them_into_the_stored_weights():
    """QLoRA (finetune.lora.base_bits: 4) against LoRA on the same bf16 model: the same adapter shapes, the frozen
    weights held as NF4 (about a quarter of bf16's bytes), and after 30 steps a loss within 0.05 nats of LoRA's
    (NF4 only approximates the frozen weights). The merge folds the adapters into the stored bf16 weights."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, context_length=32, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                         ffn_hidden=256)
    stored = cast_weights(Transformer(config), torch.bfloat16)
    lora, qlora = copy.deepcopy(stored), copy.deepcopy(stored)
    lora_losses, qlora_losses = train_adapters(lora, 16), train_adapters(qlora, 4)
    adapters = {model: {n: p.shape for n, p in model.named_parameters() if p.requires_grad} for model in (lora, qlora)}
    assert adapters[lora] == adapters[qlora] and all("lora_" in name for name in adapters[qlora])
    frozen = qlora.layers[0].self_attn.q_proj.weight
    assert type(frozen).__name__ == "NF4Tensor" and frozen.dtype == torch.bfloat16
    assert abs(qlora_losses[0] - lora_losses[0]) < 0.05 and abs(qlora_losses[-1] - lora_losses[-1]) < 0.05
    assert qlora_losses[-1] < qlora_losses[0] - 0.3  # it learns

    layer = qlora.layers[0].self_attn.q_proj
    expected = (stored.layers[0].self_attn.q_proj.weight.float()
                + layer.scaling * (layer.lora_B @ layer.lora_A)).to(torch.bfloat16)
    merge_lora(qlora, stored.state_dict().__getitem__)
    merged = qlora.layers[0].self_attn.q_proj.weight
    assert type(merged.data) is torch.Tensor and merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, expected, atol=0, rtol=0)
    assert torch.equal(qlora.layers[0].mlp.down_proj.weight, stored.layers[0].mlp.down_proj.weight)  # not adapted


def test_a_qlora_base_is_quantized_weight_by_weight_as_it_is_read(tmp_path):
    """Under a 4-bit base, finetune loads the model with `nf4_as_loaded`: each target weight is NF4 as soon as it
    is read (so a 7B base is never held whole in bf16), the other weights keep the stored dtype, and the model
    computes as one loaded in bf16 and quantized afterwards."""
    from llmpipe.model.lora import nf4_as_loaded

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, context_length=32, n_layer=2, d_model=128, n_head=4, n_kv_head=2,
                         ffn_hidden=256)
    write_model(tmp_path, cast_weights(Transformer(config), torch.bfloat16))
    settings = LoRASettings(rank=8, alpha=16.0, dropout=0.0, target_modules=("q_proj", "up_proj"), base_bits=4)
    loaded, _ = load_model(tmp_path, convert=nf4_as_loaded(settings))
    kinds = {name: type(p).__name__ for name, p in loaded.named_parameters()}
    assert {name for name, kind in kinds.items() if kind == "NF4Tensor"} == {
        f"layers.{i}.{module}.weight" for i in range(2) for module in ("self_attn.q_proj", "mlp.up_proj")}
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    afterwards, _ = load_model(tmp_path)
    for model in (loaded, afterwards):
        torch.manual_seed(1)
        add_lora(model, settings)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(tokens)[0], afterwards(tokens)[0], atol=0, rtol=0)


def test_an_nf4_base_needs_whole_blocks():
    from llmpipe.errors import ParamError
    from llmpipe.model.lora import check_rank

    model = bf16_model()  # d_model 32: a 32 × 32 query projection is 16 blocks of 64
    check_rank(model, LoRASettings(rank=4, base_bits=4), "finetune.lora")
    model.layers[0].self_attn.q_proj = torch.nn.Linear(33, 32, bias=False)
    with pytest.raises(ParamError, match=r"finetune.lora.base_bits: 4 needs whole 64-weight NF4 blocks, and "
                                         r"layers.0.self_attn.q_proj has 1056 weights; use 16"):
        check_rank(model, LoRASettings(rank=4, base_bits=4), "finetune.lora")


def test_qlora_in_several_processes_is_refused_before_any_work(monkeypatch):
    import yaml
    from harness import ROOT

    from llmpipe.config.params import StageParams
    from llmpipe.errors import ParamError
    from llmpipe.train.finetune_settings import finetune_settings

    composed = yaml.safe_load((ROOT / "params.yaml").read_text())
    composed["finetune"].update(method="lora", lora={**composed["finetune"]["lora"], "base_bits": 4})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ParamError, match=r"finetune.lora.base_bits=4 \(QLoRA\) runs in one process"):
        finetune_settings(StageParams("finetune", composed, ["finetune", "seed"]), True, True)
    composed["finetune"]["lora"]["base_bits"] = 8
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ParamError, match=r"finetune.lora.base_bits"):
        finetune_settings(StageParams("finetune", composed, ["finetune", "seed"]), True, True)


def test_a_gguf_variant_of_a_bf16_model_is_dequantized_into_bf16(tmp_path):
    """evaluate holds a bf16 model's GGUF variants in bf16 (half the memory of fp32), one rounding of the fp32
    dequantized values."""
    from small_inputs import train_test_tokenizer

    from llmpipe.gguf.files import plan_tensors, read_gguf_model, write_gguf

    tokenizer = train_test_tokenizer(tmp_path / "tok", 300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=1, d_model=64, n_head=2,
                         n_kv_head=1, ffn_hidden=128)
    model = cast_weights(Transformer(config), torch.bfloat16)
    write_gguf(tmp_path / "m.gguf", model, tokenizer, plan_tensors(model, "Q8_0", "F16", None, None), "Q8_0", "m")
    exact, halved = (read_gguf_model(tmp_path / "m.gguf", tokenizer, dtype) for dtype in (torch.float32, torch.bfloat16))
    assert exact.dtype == torch.float32 and halved.dtype == torch.bfloat16
    for (name, a), b in zip(exact.state_dict().items(), halved.state_dict().values()):
        if not name.startswith("rope_"):
            assert torch.equal(a.to(torch.bfloat16), b), name
