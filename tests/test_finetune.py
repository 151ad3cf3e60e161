"""Fine-tuning: chat template and loss mask, padding, epochs, LoRA."""

import copy

import pytest
import torch
import yaml
from harness import ROOT
from small_inputs import train_test_tokenizer

from llmpipe.config.params import StageParams
from llmpipe.data.chat_examples import example_statistics
from llmpipe.errors import ParamError
from llmpipe.model.lora import LoRALinear, add_lora, merge_lora
from llmpipe.model.transformer import IGNORE_INDEX, ModelConfig, Transformer
from llmpipe.text.chat_template import ChatTemplate, pad_batch
from llmpipe.train.chat_tokens import train_only_token_rows
from llmpipe.train.example_batches import EpochBatches
from llmpipe.train.finetune_settings import LoRASettings, finetune_settings
from llmpipe.train.loop import make_optimizer
from llmpipe.train.settings import TrainingParams

QA = [{"role": "user", "content": "What is the birth city of Ada?"}, {"role": "assistant", "content": "Lisbon"}]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return ChatTemplate(train_test_tokenizer(tmp_path_factory.mktemp("tok"), 400))


def model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, context_length=64, n_layer=2, d_model=32, n_head=4,
                                   n_kv_head=2, ffn_hidden=48))


def test_labels_cover_the_answer_and_its_end_of_turn_only(template):
    example = template.encode_example(QA, max_length=64)
    answer = [token for token in example.labels if token != IGNORE_INDEX]
    assert template.tokenizer.decode(answer) == " Lisbon<|end|>"
    assert len(example.ids) == len(example.labels)
    assert template.tokenizer.decode(example.ids).startswith("<|user|> What is the birth city of Ada?<|end|><|assistant|>")
    prompt = template.encode_prompt(QA[:1])
    assert prompt == example.ids[:len(prompt)]  # generation starts exactly where training's answer starts


def test_prompt_tokens_contribute_nothing_to_loss_or_gradient(template):
    net = model(template.tokenizer.vocab_size)
    example = template.encode_example(QA, max_length=64)
    ids, labels = torch.tensor([example.ids]), torch.tensor([example.labels])
    logits, _ = net(ids)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    prompt_positions = (labels[0] == IGNORE_INDEX)
    assert prompt_positions.sum() > 5
    assert torch.count_nonzero(logits.grad[0, prompt_positions]) == 0
    assert torch.count_nonzero(logits.grad[0, ~prompt_positions]) > 0
    # The model's own loss is the mean over answer tokens only.
    with torch.no_grad():
        _, model_loss = net(ids, labels)
    answer_logits = logits[0, ~prompt_positions]
    manual = torch.nn.functional.cross_entropy(answer_logits, labels[0, ~prompt_positions])
    assert model_loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_right_padding_changes_no_example_loss(template):
    net = model(template.tokenizer.vocab_size).eval()
    short = template.encode_example(QA, 64)
    long = template.encode_example([{"role": "user", "content": "Which university did Ada Lovelace attend, please?"},
                                    {"role": "assistant", "content": "Westerly University"}], 64)
    ids, labels = pad_batch([short, long], pad_id=0)
    with torch.no_grad():
        _, batch_sum = net(ids, labels, loss_reduction="sum")
        singles = sum(float(net(torch.tensor([e.ids]), torch.tensor([e.labels]), loss_reduction="sum")[1])
                      for e in (short, long))
    assert float(batch_sum) == pytest.approx(singles, rel=1e-5)


def test_long_examples_are_truncated_and_counted(template):
    long_answer = [QA[0], {"role": "assistant", "content": "word " * 200}]
    long_question = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "answer"}]
    encoded, truncated = template.encode_examples([{"messages": m} for m in (QA, long_answer, long_question)], 64)
    assert truncated == 2
    # The long answer is cut to the context; the long question leaves no answer token and is left out.
    assert len(encoded) == 2 and len(encoded[1].ids) == 64


def test_epochs_visit_every_example_once(template):
    examples, _ = template.encode_examples([{"messages": QA}] * 10, 64)
    batches = EpochBatches(examples, global_examples=4, micro_examples=2, pad_id=0, seed=1)
    seen = batches.global_batch_indices(0) + batches.global_batch_indices(1) + batches.global_batch_indices(2)[:2]
    assert sorted(seen) == list(range(10))
    assert len(batches.global_batch(3)) == 2


def test_statistics_report_duplicates_and_empty_answers():
    examples = [{"messages": QA}, {"messages": QA}, {"messages": [QA[0], {"role": "assistant", "content": " "}]}]
    assert example_statistics(examples) == {"examples": 3, "duplicate_examples": 1, "empty_examples": 1}


def test_lora_starts_as_an_exact_no_op_and_merging_equals_the_adapter():
    base = model(50).eval()
    tokens = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        expected, _ = base(tokens)
    adapted = model(50)
    wrapped = add_lora(adapted, LoRASettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")))
    assert len(wrapped) == 6
    adapted.eval()
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(adapted(tokens)[0], expected)
        untrained = copy.deepcopy(adapted)
        merge_lora(untrained)
        for name, tensor in base.state_dict().items():
            assert torch.equal(untrained.state_dict()[name], tensor), name
        for name, parameter in adapted.named_parameters():  # as if trained
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.1)
        with_adapter, _ = adapted(tokens)
        weight = adapted.layers[0].self_attn.q_proj.weight
        merged = merge_lora(adapted)
        merged_logits, _ = merged(tokens)
    assert merged is adapted and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.layers[0].self_attn.q_proj.weight is weight  # in place: no second copy of the weights
    assert set(merged.state_dict()) == set(base.state_dict())
    assert not torch.allclose(with_adapter, expected)
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_chat_tokens_training_changes_only_the_special_tokens_rows(tied):
    torch.manual_seed(0)
    trained = Transformer(ModelConfig(vocab_size=50, context_length=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                      ffn_hidden=48, tie_embeddings=tied))
    before = {name: tensor.clone() for name, tensor in trained.state_dict().items()}
    names = train_only_token_rows(trained, [3, 7])
    assert names == (["embed_tokens.weight"] if tied else ["embed_tokens.weight", "lm_head.weight"])
    settings = TrainingParams(max_steps=3, learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=0,
                             weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, log_every=1, eval_every=0,
                             checkpoint_every=0, precision="fp32", compile=False, parallelism="ddp")
    optimizer = make_optimizer(trained, settings, torch.device("cpu"))
    tokens = torch.tensor([[3, 10, 11, 7, 12, 13, 3, 14, 7]])
    for _ in range(3):  # the special tokens are inputs and targets
        _, loss = trained(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = trained.state_dict()
    for name, tensor in before.items():
        if name in ("embed_tokens.weight", "lm_head.weight"):  # tied: one matrix under both names
            changed = (after[name] != tensor).any(dim=1)
            assert changed[[3, 7]].all() and changed.sum() == 2, name
        else:
            assert torch.equal(after[name], tensor), name


def test_chat_tokens_refuses_weight_decay_that_would_shrink_the_frozen_rows():
    composed = yaml.safe_load((ROOT / "params.yaml").read_text())
    composed["finetune"].update(method="chat_tokens", weight_decay=0.1)
    params = StageParams("finetune", composed, ["finetune", "seed"])
    with pytest.raises(ParamError, match="finetune.weight_decay: method chat_tokens needs 0, got 0.1"):
        finetune_settings(params, validation_people=True, validation_examples=True)


@pytest.mark.parametrize("method, peak, floor", [("chat_tokens", 1e-2, 1e-3), ("full", 3e-4, 1e-4), ("lora", 3e-3, 1e-4)])
def test_null_learning_rates_take_the_methods_own_and_a_set_one_wins(method, peak, floor):
    composed = yaml.safe_load((ROOT / "params.yaml").read_text())
    composed["finetune"].update(method=method, learning_rate=None, min_learning_rate=None)
    section = finetune_settings(StageParams("finetune", composed, ["finetune", "seed"]), True, True).finetune
    assert (section.learning_rate, section.min_learning_rate) == (peak, floor)
    composed["finetune"].update(learning_rate=peak / 20)  # below the method's floor: the floor follows the peak
    section = finetune_settings(StageParams("finetune", composed, ["finetune", "seed"]), True, True).finetune
    assert (section.learning_rate, section.min_learning_rate) == (peak / 20, pytest.approx(floor / 20))
    composed["finetune"].update(min_learning_rate=peak)  # a floor above the peak is the user's input error
    with pytest.raises(ParamError, match=r"finetune.min_learning_rate: .* must not exceed learning_rate"):
        finetune_settings(StageParams("finetune", composed, ["finetune", "seed"]), True, True)


def test_chat_streams_the_greedy_answer_until_end_of_turn(template, capsys):
    from llmpipe.cli import stream_answer
    from llmpipe.model.generation import Engine, SamplingSettings

    net = model(template.tokenizer.vocab_size).eval()
    settings = SamplingSettings(max_new_tokens=12)
    question = [{"role": "user", "content": "What is the birth city of Ada?"}]
    answer = stream_answer(net, template.tokenizer, template, question, settings)
    stop = {template.end_of_turn, template.tokenizer.end_of_document_id}
    expected_ids = Engine(net, stop).generate([template.encode_prompt(question)], settings)[0]  # the batched path
    assert answer == template.tokenizer.decode(expected_ids, skip_special_tokens=True).lstrip()
    assert capsys.readouterr().out == answer + "\n"


def test_jinja_template_uses_the_configured_special_tokens(template):
    import jinja2

    messages = [{"role": "system", "content": "Be brief."}, QA[0], QA[1]]
    rendered = jinja2.Template(template.jinja()).render(messages=messages, add_generation_prompt=False)
    assert rendered == template.render(messages) == "<|system|> Be brief.<|end|><|user|> What is the birth city of Ada?<|end|><|assistant|> Lisbon<|end|>"

    class CustomTokens:  # tokenizer.special_tokens set to other strings, one with a quote
        special_tokens = {"end_of_document": "</s>", "system": "[SYS]", "user": "<it's you>", "assistant": "[A]",
                          "end_of_turn": "</turn>"}
        special_ids = {role: index for index, role in enumerate(special_tokens)}
        chat_template = None

    custom = ChatTemplate(CustomTokens())
    rendered = jinja2.Template(custom.jinja()).render(messages=messages, add_generation_prompt=True)
    assert rendered == custom.render(messages) + "[A]"
    assert rendered.startswith("[SYS] Be brief.</turn><it's you> What is")
