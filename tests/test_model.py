"""The transformer: shapes, causality, KV cache, parameter counts, generation."""

import time

import pytest
import torch
from harness import ROOT

from llmpipe.config.compose import compose
from llmpipe.config.params import StageParams
from llmpipe.model.generation import (
    Engine,
    SamplingSettings,
    next_token_distribution,
    top_next_tokens,
)
from llmpipe.model.size import parameter_count
from llmpipe.model.transformer import (
    ModelConfig,
    Transformer,
    count_parameters,
    rotate_half,
)
from llmpipe.model.weights import load_model, save_model
from llmpipe.runner.heartbeat import Heartbeat, printed
from llmpipe.train.settings import model_config


def tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    values = dict(vocab_size=97, context_length=40, n_layer=2, d_model=32, n_head=4, n_kv_head=2, ffn_hidden=48)
    values.update(changes)
    return Transformer(ModelConfig(**values)).eval()


def test_shapes_and_loss():
    model = tiny()
    tokens = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        logits, _ = model(tokens)
        _, loss = model(tokens, tokens)
    assert logits.shape == (3, 17, 97)
    assert loss.ndim == 0 and 3.5 < loss.item() < 5.5  # about ln(97) = 4.57 at initialization


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny()
    tokens = torch.randint(0, 97, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    before, _ = model(tokens)
    after, _ = model(changed)
    assert torch.equal(before[0, :12], after[0, :12])
    assert not torch.allclose(before[0, 12:], after[0, 12:])


def test_kv_cache_gives_the_logits_of_full_recomputation():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 24))
    full, _ = model(tokens)
    cache = model.new_cache(2, 24)
    prefix, _ = model(tokens[:, :10], cache=cache)           # prompt in one pass
    chunk, _ = model(tokens[:, 10:13], cache=cache)          # several tokens after a cached prefix
    steps = [model(tokens[:, i:i + 1], cache=cache)[0] for i in range(13, 24)]  # one at a time
    cached = torch.cat([prefix, chunk, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [SamplingSettings(max_new_tokens=15),
                                      SamplingSettings(max_new_tokens=15, temperature=0.9, top_k=20, top_p=0.9, seed=4)])
def test_generation_with_cache_equals_generation_without(settings):
    model = tiny()
    prompt = [5, 17, 33, 2]
    with_cache = list(Engine(model).stream(prompt, settings))
    without = list(Engine(model, use_cache=False).stream(prompt, settings))
    assert with_cache == without and len(with_cache) == 15


def test_generation_stops_at_stop_token_and_context_end():
    model = tiny()
    first = next(iter(Engine(model).stream([1, 2, 3], SamplingSettings(max_new_tokens=5))))
    assert list(Engine(model, stop_ids={first}).stream([1, 2, 3], SamplingSettings(max_new_tokens=5))) == []
    # A prompt too long for the 40-token context keeps its end and leaves room for the answer:
    # all 10 new tokens, or at most half the context.
    assert len(list(Engine(model).stream(list(range(38)), SamplingSettings(max_new_tokens=10)))) == 10
    assert len(list(Engine(model).stream(list(range(38)), SamplingSettings(max_new_tokens=30)))) == 20


def test_batched_generation_equals_one_prompt_at_a_time():
    """Prompts of different lengths, decoded in batches of equal length, give each prompt's own greedy answer."""
    model = tiny()
    prompts = [[5, 17, 33, 2], [9, 1], [4, 4, 4, 4], [7, 3, 8], [9, 2]]
    settings = SamplingSettings(max_new_tokens=12)
    one_by_one = [list(Engine(model).stream(p, settings)) for p in prompts]
    assert Engine(model).generate(prompts, settings, batch_size=2) == one_by_one
    stop = one_by_one[0][-1]
    stopped = Engine(model, stop_ids={stop}).generate(prompts, settings)
    assert stopped == [answer[:answer.index(stop)] if stop in answer else answer for answer in one_by_one]


def test_padded_batches_give_each_prompt_its_own_answer():
    """Prompts of different lengths left-padded into one batch (pads masked; rotary angles are relative): each
    prompt's greedy answer and logits are those it gets alone."""
    model = tiny()
    prompts = [[5, 17, 33, 2], [9, 1], [4, 4, 4, 4, 4, 4], [7, 3, 8], [9, 2]]
    settings = SamplingSettings(max_new_tokens=10)
    one_by_one = [list(Engine(model).stream(p, settings)) for p in prompts]
    assert Engine(model).generate(prompts, settings, padded=True) == one_by_one
    generator = torch.Generator()
    first = next(Engine(model).decode(prompts[:2], SamplingSettings(max_new_tokens=1), generator, padded=True))
    assert first.tolist() == [one_by_one[0][0], one_by_one[1][0]]
    cache = model.new_cache(1, 8)
    cache.valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    padded_logits, _ = model(torch.tensor([[0, 0, 9, 1]]), cache=cache)
    torch.testing.assert_close(padded_logits[0, 2:], model(torch.tensor([[9, 1]]))[0][0], atol=1e-5, rtol=1e-5)


def test_generation_reports_each_batch_and_long_loops_print_progress(capsys):
    """Engine.generate says after each batch how many prompts are done; a Heartbeat turns that into a line at
    least every interval (none when the loop is quicker than the interval)."""
    done = []
    Engine(tiny()).generate([[5, 17], [9, 1], [4, 4, 4]], SamplingSettings(max_new_tokens=2), batch_size=1,
                            on_batch=done.append)
    assert done == [1, 2, 3]
    printed()  # (this process has been quiet for long: the test's own line starts the count)
    with Heartbeat("quiet:", 3, "questions") as quiet, Heartbeat("evaluate: Q4_K: qa:", 3, "questions", 0.2) as beat:
        quiet.tick(3)
        beat.tick(1)
        time.sleep(0.5)  # one long step: the lines keep coming
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and all(line.startswith("evaluate: Q4_K: qa: 1/3 questions, 0:00 elapsed, eta ")
                                   for line in lines)  # nothing from the quiet one


def test_a_loaded_model_is_its_weights_file_mapped_not_copied(tmp_path):
    """load_model makes the file's tensors the parameters: no random initialization first, no second copy (peak
    memory grows by about one file), tied weights stay tied, the rotary tables are the constructor's."""
    import subprocess
    import sys

    for tie in (True, False):
        original = tiny(tie_embeddings=tie)
        save_model(tmp_path / str(tie), original)
        loaded, _ = load_model(tmp_path / str(tie))
        assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
        assert torch.equal(loaded.rope_cos, original.rope_cos) and torch.equal(loaded.rope_sin, original.rope_sin)
        for name, tensor in original.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    big = Transformer(ModelConfig(vocab_size=1000, context_length=64, n_layer=4, d_model=512, n_head=8, n_kv_head=8,
                                  ffn_hidden=2048))  # 17M parameters: 68 MB
    save_model(tmp_path / "big", big)
    size = (tmp_path / "big/model.safetensors").stat().st_size
    code = ("import resource, torch; from llmpipe.model.weights import load_model; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"model, _ = load_model({str(tmp_path / 'big')!r}); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=ROOT).stdout.split()[-1])
    assert grown < 1.3 * size, (grown, size)  # before: a random model, then the file copied into it (2x)


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert (next_token_distribution(logits, SamplingSettings(temperature=1.0, top_k=2)) > 0).sum() == 2
    probabilities = logits.softmax(-1)
    nucleus = next_token_distribution(logits, SamplingSettings(temperature=1.0, top_p=float(probabilities[0]) + 0.01))
    assert (nucleus > 0).sum() == 2 and abs(float(nucleus.sum()) - 1) < 1e-6
    ranked = top_next_tokens(tiny(), [1, 2, 3], 3)
    assert len(ranked) == 3 and ranked[0][1] >= ranked[1][1] >= ranked[2][1]


def test_rotate_half_convention():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_tied_embeddings_are_one_matrix():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 97 * 32


@pytest.mark.parametrize("preset, expected", [
    ("llama2_7b", 6_738_415_616),      # Llama 2 7B as published
    ("llama3_8b", 8_030_261_248),      # Llama 3 8B
    ("tinyllama_1b", 1_100_048_384),   # TinyLlama 1.1B
])
def test_published_model_shapes_have_exact_parameter_counts(preset, expected):
    composed = compose([f"model={preset}"], ROOT / "conf")
    config = model_config(StageParams("t", composed, ["model"]), None)
    assert parameter_count(config) == expected  # built on the meta device: nothing allocated


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(vocab_size=10, context_length=8, n_layer=1, d_model=12, n_head=3, n_kv_head=2, ffn_hidden=8)


@pytest.mark.parametrize("tie", [True, False])
def test_same_weights_in_transformers_llama_give_the_same_logits(tie):
    pytest.importorskip("transformers")
    from llmpipe.hf.export import hf_model

    ours = tiny(tie_embeddings=tie)
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        expected, _ = ours(tokens)
        actual = hf_model(ours)(input_ids=tokens).logits
    assert (expected - actual).abs().max() < 1e-4
