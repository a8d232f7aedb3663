"""The OpenAI-compatible gateway in front of a server hosting two artifacts, driven by the
official ``openai`` package and by raw HTTP: `privlora serve` (with accounts) and `privlora
gateway` run as real processes on loopback, and every answer is compared with `privlora
generate`'s for the same greedy request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from privlora.compiler.driver import compile_artifact
from privlora.tools.loadtest import ServerProcess, free_port
from privlora.server.accounts import AccountStore
from privlora.client.transports import Credentials, HttpTransport

QUESTION = [{"role": "user", "content": "hello"}]
TOKENS = 6


@pytest.fixture(scope="module")
def artifacts(tiny_build, tmp_path_factory):
    """Two adapters on the tiny base, compiled into directories named for the models: one per-query
    (bfv), one with pads (the default), hosted by one server."""
    from conftest import write_tiny_adapter

    root = tmp_path_factory.mktemp("gateway")
    second = write_tiny_adapter(tiny_build.base, root / "adapter-b", ["q_proj", "o_proj"], seed=5)
    clinic = compile_artifact(str(tiny_build.base), tiny_build.adapter, root / "clinic", backend="bfv").artifact
    legal = compile_artifact(str(tiny_build.base), second, root / "legal", backend="pads").artifact
    return {"clinic": clinic, "legal": legal}


def generated(artifact, messages_text: str, tokens: int = TOKENS) -> str:
    """`privlora generate`'s greedy answer (in-process server), the reference."""
    run = subprocess.run([sys.executable, "-m", "privlora.cli", "generate", str(artifact), "--prompt", messages_text,
                          "--max-new-tokens", str(tokens), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.removesuffix("\n")


@pytest.fixture(scope="module")
def stack(artifacts, tmp_path_factory):
    """privlora serve (two artifacts, accounts) and privlora gateway in front of it, with a token."""
    accounts = AccountStore(tmp_path_factory.mktemp("accounts") / "accounts.db", create=True)
    token = accounts.create("gateway-user")
    server = ServerProcess([artifacts["clinic"], artifacts["legal"]], "--accounts", str(accounts.path)).start()
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "privlora.cli", "gateway", str(artifacts["clinic"]),
                                str(artifacts["legal"]), "--server", server.url, "--port", str(port)],
                               env={**os.environ, "PRIVLORA_TOKEN": token}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert gateway.poll() is None, gateway.stderr.read()
        try:
            httpx.get(f"{url}/health").raise_for_status()
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.2)
    yield {"url": url, "server": server, "token": token, "operator": accounts.create("operator", admin=True)}
    gateway.terminate()
    gateway.wait(30)
    server.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="not-needed-on-loopback", max_retries=0)


@pytest.fixture(scope="module")
def expected(artifacts) -> dict[str, str]:
    answers = {name: generated(artifact, "hello") for name, artifact in artifacts.items()}
    assert answers["clinic"] != answers["legal"]  # two adapters, two answers: a mix-up would show
    return answers


def test_models_are_listed_by_name_and_id(client, artifacts):
    models = {model.id: model for model in client.models.list().data}
    assert set(models) == {"clinic", "legal"}
    assert models["clinic"].owned_by == "privlora" and models["clinic"].model_extra["backend"] == "bfv"
    assert len(models["legal"].model_extra["artifact"]) == 64


@pytest.mark.parametrize("model", ["clinic", "legal"])
def test_answers_equal_generate_streamed_and_not(client, expected, model):
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=TOKENS, temperature=0)
    choice = answer.choices[0]
    assert choice.message.content == expected[model] and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == TOKENS
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + TOKENS and answer.model == model
    stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[model]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert len({c.id for c in chunks}) == 1


def test_raw_server_sent_events_end_with_done(stack, expected):
    body = {"model": "clinic", "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected["clinic"]


def test_a_conversation_and_stop_strings(client, artifacts, expected):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": expected["clinic"]},
                    {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "then"}]}]
    answer = client.chat.completions.create(model="clinic", messages=conversation, max_tokens=TOKENS, temperature=0)
    assert answer.choices[0].message.content  # the template took all four turns (checked in the tokenizer tests)
    stop = expected["clinic"][2:4]
    stopped = client.chat.completions.create(model="clinic", messages=QUESTION, max_tokens=TOKENS, temperature=0,
                                             stop=[stop])
    assert stopped.choices[0].message.content == expected["clinic"][:expected["clinic"].index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="clinic", messages=QUESTION, max_tokens=TOKENS, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == stopped.choices[0].message.content


def test_bad_requests_get_openai_errors(client, stack):
    def refused(**request):
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(**{"model": "clinic", "messages": QUESTION, "max_tokens": 4, **request})
        return error.value.status_code, error.value.body

    status, body = refused(model="no-such-model")
    assert status == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    assert refused(temperature=2.5)[0] == 400
    assert refused(top_p=0)[0] == 400
    assert refused(max_tokens=0)[0] == 400
    assert refused(n=2)[0] == 400
    assert refused(messages=[])[0] == 400
    assert refused(messages=[{"role": "robot", "content": "hi"}])[0] == 400
    assert refused(stop=["a", "b", "c", "d", "e"])[0] == 400
    status, body = refused(messages=[{"role": "user", "content": "word " * 300}])
    assert status == 413 and body["code"] == "context_length_exceeded"
    assert refused(max_tokens=10_000)[0] == 413
    garbage = httpx.post(stack["url"] + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_wait_in_line_and_one_session_per_artifact_is_kept(client, stack, expected):
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        model = "clinic" if i % 2 else "legal"
        reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=TOKENS, temperature=0)
        answers[i] = reply.choices[0].message.content == expected[model]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == {0: True, 1: True, 2: True, 3: True}
    health = HttpTransport(stack["server"].url, Credentials(stack["operator"])).info()  # sessions: an admin's view
    assert sorted(a["sessions"] for a in health["artifacts"]) == [1, 1]  # reused: one session per artifact


def test_sampling_with_a_seed_is_repeatable(client):
    def sample() -> str:
        return client.chat.completions.create(model="legal", messages=QUESTION, max_tokens=TOKENS, temperature=1.0,
                                              top_p=0.9, seed=7).choices[0].message.content

    assert sample() == sample()
