"""The training loop: schedule, numerical failure, checkpoint round trip (in process)."""

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

from llmpipe.errors import ParamError, PipelineError
from llmpipe.eval.metrics import (
    bits_per_byte,
    language_model_loss,
    unigram_bits_per_byte,
)
from llmpipe.model.transformer import ModelConfig, Transformer
from llmpipe.runner.distributed import ProcessInfo
from llmpipe.tracking.stage_run import StageRun
from llmpipe.train import settings as train_settings
from llmpipe.train.batches import RandomWindows
from llmpipe.train.checkpoint import CheckpointStore
from llmpipe.train.loop import learning_rate_at, make_optimizer, train
from llmpipe.train.settings import (
    BatchGeometry,
    PretrainParams,
    TrainingParams,
    resolve_precision,
)

CPU = ProcessInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def settings(**changes) -> TrainingParams:
    values = dict(max_steps=6, learning_rate=1e-2, min_learning_rate=1e-3, warmup_steps=2, weight_decay=0.1,
                  beta1=0.9, beta2=0.95, grad_clip=1.0, eval_every=3, checkpoint_every=2, log_every=1)
    values.update(changes)
    values.setdefault("precision", "fp32")
    return TrainingParams(**values)


def setup(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=50, context_length=16, n_layer=1, d_model=16, n_head=2,
                                    n_kv_head=1, ffn_hidden=32))
    tokens = np.random.default_rng(0).integers(0, 50, 2000).astype(np.uint16)
    return model, RandomWindows(tokens, 16, 8, 4, seed)


def no_eval(model):
    return {"val_loss": 0.0}


def test_warmup_then_cosine_to_the_floor():
    s = settings(max_steps=100, warmup_steps=10)
    assert learning_rate_at(0, s) == pytest.approx(1e-3)
    assert learning_rate_at(9, s) == pytest.approx(1e-2)
    assert learning_rate_at(55, s) == pytest.approx((1e-2 + 1e-3) / 2)
    assert learning_rate_at(100, s) == pytest.approx(1e-3)


def test_batches_are_a_pure_function_of_the_step():
    _, batches = setup()
    first, again = batches.global_batch(5), batches.global_batch(5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert len(first) == 2 and first[0][0].shape == (4, 16)
    assert torch.equal(first[0][0][:, 1:], first[0][1][:, :-1])  # targets are inputs shifted by one


def test_resuming_from_a_checkpoint_reproduces_the_uninterrupted_weights(tmp_path):
    model, batches = setup()
    train(model, settings(), batches, no_eval, CPU, StageRun("t", {}, {}, enabled=False), None)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    store = CheckpointStore(tmp_path / "ckpt")
    model, batches = setup()
    train(model, settings(max_steps=6, checkpoint_every=2), batches, no_eval, CPU,
          StageRun("t", {}, {}, enabled=False), store)
    # Drop the later checkpoints: resume from step 2 as if the run had been killed at step 3.
    for step in store.steps()[1:]:
        shutil.rmtree(store.directory / f"step-{step:07d}")
    assert store.steps() == [2]
    model, batches = setup(seed=0)
    result = train(model, settings(), batches, no_eval, CPU, StageRun("t", {}, {}, enabled=False), store)
    assert result.resumed_from == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, uninterrupted[name]), name


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, batches = setup()
    store = CheckpointStore(tmp_path / "ckpt")

    class PoisonAtStep3:
        def global_batch(self, step):
            if step == 3:
                with torch.no_grad():
                    model.norm.weight.fill_(float("nan"))
            return batches.global_batch(step)

    # Steps count from 1 in logs and checkpoints: the batch of step index 3 is step 4.
    with pytest.raises(PipelineError, match=r"loss is nan at step 4; last good checkpoint kept at .*step-0000003"):
        train(model, settings(checkpoint_every=1), PoisonAtStep3(), no_eval, CPU,
              StageRun("t", {}, {}, enabled=False), store)
    assert store.steps()[-1] == 3  # nothing written after the failure
    reloaded, _ = setup()
    store.load(store.latest(), reloaded, make_optimizer(reloaded, settings(), CPU.device))
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_keep_best_returns_the_best_evaluated_weights():
    model, batches = setup()
    scores = iter([3.0, 1.0, 2.0])
    snapshots = {}

    def evaluate(m):
        score = next(scores)
        snapshots[score] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"val_loss": score}

    result = train(model, settings(max_steps=9, eval_every=3, best_metric="val_loss"), batches, evaluate, CPU,
                   StageRun("t", {}, {}, enabled=False), None)
    assert result.best_step == 6
    assert all(torch.equal(v, snapshots[1.0][k]) for k, v in model.state_dict().items())


def test_uniform_model_perplexity_equals_vocabulary_and_bits_per_byte():
    model, _ = setup()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0 → uniform over 50 tokens
    tokens = np.random.default_rng(1).integers(0, 50, 300)
    loss, predicted = language_model_loss(model, tokens, None, 4, "cpu")
    assert predicted == 299
    assert math.exp(loss) == pytest.approx(50, rel=1e-5)
    # 299 tokens of ln(50) nats over 598 bytes = log2(50) / 2 bits per byte
    assert bits_per_byte(loss, predicted, 300, 598) == pytest.approx(math.log2(50) * 299 / 598, rel=1e-5)
    flat = unigram_bits_per_byte(np.arange(50).repeat(10), tokens, 50, 598)
    assert flat == pytest.approx(math.log2(50) * 299 / 598, rel=1e-6)


def test_kl_divergence_is_zero_for_the_same_distribution_and_known_otherwise():
    from llmpipe.eval.metrics import mean_kl_divergence

    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    assert mean_kl_divergence(p, p) == 0.0
    expected = (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    assert mean_kl_divergence(p, q) == pytest.approx(expected, rel=1e-6)


def test_settings_are_frozen_and_batch_geometry_is_checked_once():
    with pytest.raises(Exception):
        settings().learning_rate = 1.0  # frozen: nothing patches settings after they are built
    assert BatchGeometry("pretrain", 32, 8, world_size=4).micro_sequences == 8
    # The micro-batch is an execution detail: the largest one below the request that divides the global batch and
    # that the processes can share is used (the gradient is the global batch's either way).
    assert BatchGeometry("pretrain", 30, 8, world_size=1).micro_sequences == 6
    assert BatchGeometry("finetune", 16, 8, world_size=4).micro_sequences == 4
    assert BatchGeometry("pretrain", 32, 32, world_size=2).micro_sequences == 16  # the default, on 2 processes
    with pytest.raises(ParamError, match="finetune.global_batch_sequences: 2 sequences cannot be shared by 4 proc"):
        BatchGeometry("finetune", 2, 2, world_size=4)


def test_every_checkpoint_tensor_file_is_read_without_unpickling(tmp_path):
    import os
    import pickle

    class Plant:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code-ran'}",))

    store = CheckpointStore(tmp_path / "checkpoints")
    store.directory.mkdir()
    (store.directory / "best.safetensors").write_bytes(pickle.dumps(Plant()))
    with pytest.raises(PipelineError, match=r"best.safetensors: unreadable checkpoint file .*delete the checkpoint"):
        store.load_best()
    assert not (tmp_path / "code-ran").exists()


def test_progress_off_a_terminal_prints_plain_lines_with_eta_and_short_evaluation_lines():
    import io

    from llmpipe.train.progress import Progress

    log = io.StringIO()  # not a terminal
    progress = Progress("pretrain", total_steps=4, start_step=0, enabled=True, interval_seconds=0.0, stream=log)
    for done in range(1, 5):
        progress.step(done, train_loss=1.0 / done, tokens_per_second=1234.0)
    metrics = {"val_loss": 0.5, "qa_accuracy_validation_people": 0.9,
               **{f"qa_accuracy_validation_people_{a}": 0.9 for a in ("birth_city", "birth_date", "employer", "major")}}
    progress.evaluation(4, metrics)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5
    assert lines[0].startswith("pretrain: step 1/4 loss 1.0000 1,234 tok/s elapsed 0:00 eta ")
    assert lines[-1] == "pretrain: step 4/4 val_loss 0.5000 qa_accuracy_validation_people 0.9000"
    silent = io.StringIO()
    Progress("pretrain", 4, 0, enabled=False, stream=silent).step(1, 1.0, None)
    assert silent.getvalue() == ""


def test_fsdp_needs_as_many_micro_batches_in_every_process_and_the_key_ignores_runtime_params():
    from llmpipe.train.checkpoint import checkpoint_key

    assert BatchGeometry("pretrain", 8, 2, world_size=2, parallelism="fsdp").world_size == 2
    assert BatchGeometry("pretrain", 6, 2, world_size=2).micro_sequences == 2  # DDP: 2 and 1 micro-batches are fine
    assert BatchGeometry("pretrain", 6, 2, world_size=2, parallelism="fsdp").micro_sequences == 1  # 3 each
    with pytest.raises(ParamError, match=r"pretrain.parallelism: fsdp needs pretrain.global_batch_sequences \(5\) to "
                                         r"be a multiple of the 2 processes"):
        BatchGeometry("pretrain", 5, 5, world_size=2, parallelism="fsdp")
    params = {"pretrain.max_steps": 6, "pretrain.processes": 2, "pretrain.parallelism": "fsdp", "seed": 1}
    same = {**params, "pretrain.processes": 1, "pretrain.parallelism": "ddp", "pretrain.nodes": 2,
            "pretrain.device": "cpu", "pretrain.log_every": 5, "pretrain.micro_batch_sequences": 3}
    assert checkpoint_key(params, {"a": "1"}) == checkpoint_key(same, {"a": "1"})
    assert checkpoint_key(params, {"a": "1"}) != checkpoint_key({**params, "pretrain.max_steps": 7}, {"a": "1"})


def test_lora_training_resumes_from_its_checkpoint(tmp_path):
    """LoRA trains matrices only (no parameter without weight decay): the sharded checkpoint still restores."""
    from llmpipe.model.lora import add_lora
    from llmpipe.train.finetune_settings import LoRASettings

    def lora_setup():
        model, batches = setup()
        add_lora(model, LoRASettings(rank=2, alpha=4.0))
        return model, batches

    model, batches = lora_setup()
    train(model, settings(), batches, no_eval, CPU, StageRun("t", {}, {}, enabled=False), None)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}
    store = CheckpointStore(tmp_path / "ckpt")
    model, batches = lora_setup()
    train(model, settings(), batches, no_eval, CPU, StageRun("t", {}, {}, enabled=False), store)
    for step in store.steps()[1:]:
        shutil.rmtree(store.directory / f"step-{step:07d}")
    model, batches = lora_setup()
    result = train(model, settings(), batches, no_eval, CPU, StageRun("t", {}, {}, enabled=False), store)
    assert result.resumed_from == 2
    assert all(torch.equal(v, uninterrupted[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("requested, native, expected", [("auto", True, "bf16"), ("auto", False, "fp32"),
                                                         ("fp32", True, "fp32"), ("bf16", False, "bf16")])
def test_precision_auto_takes_bf16_only_where_the_device_has_it_and_a_set_one_wins(monkeypatch, requested, native,
                                                                                    expected):
    monkeypatch.setattr(train_settings, "native_bf16", lambda device: native)
    assert resolve_precision(requested, torch.device("cpu")) == expected


def test_an_unknown_precision_is_refused_naming_the_key():
    from llmpipe.config.params import StageParams

    with pytest.raises(ParamError, match="pretrain.precision.*fp16"):
        section = {**dataclasses.asdict(PretrainParams()), "precision": "fp16"}
        StageParams("pretrain", {"pretrain": section}, ["pretrain"]).section("pretrain", PretrainParams)


def test_native_bf16_means_bf16_hardware_not_emulation(monkeypatch):
    # torch.cuda.is_bf16_supported() also says yes to a pre-Ampere GPU (emulated, slower than fp32): not for auto.
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train_settings.native_bf16(torch.device("cuda")) is native
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train_settings.native_bf16(torch.device("cpu")) is False


def test_bf16_training_keeps_fp32_weights_and_learns():
    model, batches = setup()
    result = train(model, settings(precision="bf16", eval_every=6), batches, no_eval, CPU,
                   StageRun("t", {}, {}, enabled=False), None)
    losses = [row["train_loss"] for row in result.history["train"]]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: bf16 matmuls, fp32 weights
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
