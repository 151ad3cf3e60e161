"""Fine-tuning: chat template and loss mask, padding, epochs, LoRA."""

import pytest
import torch
from conftest import train_test_tokenizer

from llmpipe.chat_template import ChatTemplate, pad_batch
from llmpipe.data.chat_examples import example_statistics
from llmpipe.lora import LoRASettings, add_lora, merged_copy
from llmpipe.model import IGNORE_INDEX, ModelConfig, Transformer
from llmpipe.train.batches import EpochBatches

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
        merged = merged_copy(adapted)
        for name, tensor in base.state_dict().items():
            assert torch.equal(merged.state_dict()[name], tensor), name
        for name, parameter in adapted.named_parameters():  # as if trained
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.1)
        with_adapter, _ = adapted(tokens)
        merged_logits, _ = merged_copy(adapted)(tokens)
    assert not torch.allclose(with_adapter, expected)
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=1e-5)


def test_chat_streams_the_greedy_answer_until_end_of_turn(template, capsys):
    from llmpipe.cli import stream_answer
    from llmpipe.generate import Engine, SamplingSettings

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
