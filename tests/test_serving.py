"""The registered chat model behind `mlflow models serve`: logged by the real register_chat_model into a
temporary SQLite store, served on 127.0.0.1 and asked over REST (chat-completion requests and answers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from harness import BIN, environment, stop_process_group
from small_inputs import train_test_tokenizer

from llmpipe.model.transformer import ModelConfig, Transformer
from llmpipe.model.weights import TOKENIZER_KEY, save_model

QUESTION = "What is the birth city of Ada?"
REGISTER = """
import sys
from llmpipe.serve.registry import register_chat_model
from llmpipe.tracking.stage_run import StageRun
with StageRun("evaluate", {}, {}) as run:
    version, new = register_chat_model(run, sys.argv[1], sys.argv[2], "llmpipe-chat-test")
print(version)
"""


def tiny_model_that_never_stops(tokenizer) -> Transformer:
    """An untrained model that never picks a special token (so never stops: every answer runs to max_tokens)
    nor a token that is not whole UTF-8 text by itself (so a shorter greedy answer's text is a prefix of a
    longer one's): their logits are exactly 0, below the largest of the random others."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=1, d_model=32,
                                    n_head=2, n_kv_head=1, ffn_hidden=64, tie_embeddings=False)).eval()
    never = [i for i in range(tokenizer.vocab_size)
             if i in tokenizer.special_ids.values() or "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.lm_head.weight[never] = 0.0
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, json.loads(error.read() or b"{}")
    print(f"POST /invocations {json.dumps(body)}\n  → {status} {json.dumps(answer)}")  # shown when a test fails
    return status, answer


def wait_for_ping(port: int, server: subprocess.Popen, log) -> None:
    deadline = time.time() + 90
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_served_chat_model_answers_chat_completions_and_honours_max_tokens(tmp_path):
    tokenizer = train_test_tokenizer(tmp_path / "tokenizer", 300)
    save_model(tmp_path / "model", tiny_model_that_never_stops(tokenizer), {TOKENIZER_KEY: tokenizer.fingerprint})
    env = environment(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    registered = subprocess.run([sys.executable, "-c", REGISTER, str(tmp_path / "model"), str(tmp_path / "tokenizer")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert registered.returncode == 0, registered.stderr[-4000:]
    version = registered.stdout.strip().splitlines()[-1]

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/llmpipe-chat-test/{version}",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own group: the uvicorn worker goes with it
    try:
        wait_for_ping(port, server, log)
        user = [{"role": "user", "content": QUESTION}]
        answers = {}
        for max_tokens in (1, 8):
            status, answer = post(port, {"messages": user, "max_tokens": max_tokens, "temperature": 0})
            assert status == 200, answer
            assert answer["object"] == "chat.completion" and len(answer["choices"]) == 1
            assert answer["id"].startswith("chatcmpl-") and answer["model"] == "llmpipe-chat-test"
            assert abs(answer["created"] - time.time()) < 600
            [choice] = answer["choices"]
            assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
            assert answer["usage"]["completion_tokens"] == max_tokens
            assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + max_tokens
            answers[max_tokens] = choice["message"]["content"]
        assert answers[8].startswith(answers[1]) and len(answers[8]) > len(answers[1])  # greedy: same start

        status, answer = post(port, {"messages": user, "temperature": 0})
        assert status == 200 and answer["usage"]["completion_tokens"] == 32  # the default max_tokens
        assert answer["choices"][0]["message"]["content"].startswith(answers[8])

        conversation = [{"role": "system", "content": "Answer briefly."}, *user,
                        {"role": "assistant", "content": "Lisbon"}, {"role": "user", "content": "And Bob?"}]
        status, answer = post(port, {"messages": conversation, "max_tokens": 4, "temperature": 0.8, "n": 2})
        assert status == 200, answer
        assert [c["index"] for c in answer["choices"]] == [0, 1]
        assert all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
                   for c in answer["choices"])
        assert answer["usage"]["completion_tokens"] <= 8  # sampling may draw a stop token, which no greedy step picks
        assert answer["usage"]["prompt_tokens"] > len(tokenizer.encode(QUESTION))  # the whole conversation

        status, answer = post(port, {"messages": [{"role": "tool", "content": "{}"}]})
        assert status == 400 and "role 'tool' is not supported" in answer["message"]
        assert "{}" not in answer["message"] and answer["error"]["type"] == "invalid_request_error"  # not echoed
        status, answer = post(port, {"messages": user, "stream": True})  # refused, not answered unstreamed
        assert status == 400 and answer["message"].startswith("not supported by this model: stream")
        long_question = [{"role": "user", "content": " ".join([QUESTION] * 12)}]  # over the 64-token context
        status, answer = post(port, {"messages": long_question, "max_tokens": 4, "temperature": 0})
        assert status == 400 and "this model's context is 64 tokens" in answer["message"], answer
        assert QUESTION not in answer["message"]
        status, answer = post(port, {"messages": user, "max_tokens": 60, "temperature": 0})  # 19 + 60 > 64
        assert status == 200 and answer["usage"]["total_tokens"] == 64  # the prompt whole, the answer what fits
        assert answer["choices"][0]["finish_reason"] == "length"
        status, answer = post(port, {"inputs": [QUESTION]})  # plain questions: not this model's input
        assert status == 400
    finally:
        stop_process_group(server, timeout=15)
