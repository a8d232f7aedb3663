"""The OpenAI-compatible gateway in front of a server hosting two artifacts, driven by the
official ``openai`` package and by raw HTTP: `privlora serve` (with accounts) and `privlora
gateway` run as real processes on loopback, and every answer is compared with `privlora
generate`'s for the same greedy request. The server names the models (``--name``), and the
gateway calls them as the server does, whatever their directories are called."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from privlora.compiler.driver import compile_artifact
from privlora.core.artifact import read_manifest
from privlora.core.types import groups_from_rounds
from privlora.tools.loadtest import ServerProcess
from privlora.server.accounts import AccountStore
from privlora.client.transports import Credentials, HttpTransport
from support.gateway import GatewayProcess

QUESTION = [{"role": "user", "content": "hello"}]
TOKENS = 6


@pytest.fixture(scope="module")
def artifacts(tiny_build, tmp_path_factory):
    """Two adapters on the tiny base, one per-query (bfv), one with pads (the default), hosted by
    one server under the names clinic and legal, in directories named otherwise."""
    from conftest import write_tiny_adapter

    root = tmp_path_factory.mktemp("gateway")
    second = write_tiny_adapter(tiny_build.base, root / "adapter-b", ["q_proj", "o_proj"], seed=5)
    clinic = compile_artifact(str(tiny_build.base), tiny_build.adapter, root / "build-1", backend="bfv").artifact
    legal = compile_artifact(str(tiny_build.base), second, root / "build-2", backend="pads").artifact
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
    server = ServerProcess([artifacts["clinic"], artifacts["legal"]], "--name", "clinic", "--name", "legal",
                           "--accounts", str(accounts.path)).start()
    gateway = GatewayProcess([artifacts["clinic"], artifacts["legal"]], server.url, token).start()
    yield {"url": gateway.url, "server": server, "token": token, "operator": accounts.create("operator", admin=True),
           "gateway": gateway}
    gateway.stop()
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
    assert models["clinic"].model_extra["max_tokens"] == 1024


def test_models_show_their_pads_pool(client):
    """The pads model's pool as the next answer finds it; a per-query model has none. Between
    answers the gateway tops the pool up to the rows it keeps (256 by default)."""
    deadline = time.monotonic() + 60
    while True:
        models = {model.id: model.model_extra for model in client.models.list().data}
        pads = models["legal"]["pads"]
        if (pads["ready"] >= pads["kept"] and not pads["making"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert models["clinic"]["pads"] is None
    assert pads["kept"] == 256 and pads["ready"] >= 256 and pads["making"] is False


def test_the_gateway_names_each_model_as_the_server_does(client, stack):
    """Not by its directory (build-1, build-2): the server's names, so that the server, its
    logs, `privlora models` and the gateway all say the same."""
    served = {m["id"]: m["artifact"] for m in HttpTransport(stack["server"].url, Credentials(stack["token"])).models()}
    listed = {m.id: m.model_extra["artifact"] for m in client.models.list().data}
    assert served == listed and set(listed) == {"clinic", "legal"}
    assert stack["gateway"].output().startswith("privlora gateway: models clinic, legal on ")


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
    data = [line for line in lines if not line.startswith(": privlora ")]  # the prefill's progress (below)
    assert all(line.startswith("data: ") for line in data) and data[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
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
    assert refused(max_tokens=1024)[0] == 413  # within the cap, beyond the tiny model's 256 positions
    status, body = refused(max_tokens=1025)  # the cap, as for generate and chat
    assert status == 400 and body["param"] == "max_tokens" and "1024" in body["message"]
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


def test_every_answer_carries_its_measured_cost(stack):
    """The ``privlora`` object: one step per generated token, bytes and messages on the wire, pads
    made for the pads model only, and the online phase inside the answer's time."""
    for model in ("clinic", "legal"):
        body = {"model": model, "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0}
        answer = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=60).json()
        cost = answer["privlora"]
        assert cost["steps"] == answer["usage"]["completion_tokens"] == TOKENS  # finish "length": no eos step
        online, offline = cost["online"], cost["offline"]
        assert online["messages"] >= TOKENS and online["bytes_up"] > 0 and online["bytes_down"] > 0
        assert 0 < cost["first_token_s"] < online["seconds"] <= cost["seconds"] and cost["tokens_per_second"] > 0
        assert (offline["rows"] > 0) == (model == "legal")  # pads: made between answers or on the spot
        events = streamed(stack, {**body, "stream": True})
        (last,) = [e for e in events if "privlora" in e]  # the chunk with the finish_reason, and no other
        assert last["choices"][0]["finish_reason"] == "length" and last["privlora"]["steps"] == TOKENS


def streamed(stack, body) -> list[dict]:
    """A streamed answer's data events (its comment lines apart)."""
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_the_prefill_is_reported_as_it_goes(stack, artifacts):
    """SSE comments, which OpenAI's clients skip, one per group of the prefill, all before the
    first text (the openai client's streams above read the same answers)."""
    groups = len(groups_from_rounds(read_manifest(artifacts["legal"])["rounds"]))
    body = {"model": "legal", "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    first_text = next(i for i, line in enumerate(lines) if '"content": "' in line and '"content": ""' not in line)
    prefill = [line for line in lines if line.startswith(": privlora prefill ")]
    assert prefill == [f": privlora prefill {i}/{groups}" for i in range(1, groups + 1)]
    assert lines.index(prefill[-1]) < first_text


def test_pads_made_on_the_spot_are_reported_before_the_prefill(tiny_build):
    """A cold pool (no pads kept): the wait first makes every group's pads, then runs the prefill;
    nothing is reported once the first token is out."""
    from privlora.client.assistant import Assistant, Reply
    from privlora.client.gateway import WaitReport, _answer
    from privlora.local import local_transport

    artifact = tiny_build.artifact("pads")
    assistant = Assistant(artifact, local_transport(artifact), keep_pads=0)
    emitted: list[WaitReport] = []
    prompt = assistant.encode("hello")
    pieces = list(_answer(assistant, prompt, assistant.config(TOKENS), Reply(len(prompt)), (), emitted.append))
    assistant.close()
    groups = assistant.client.groups_per_step
    assert [(p.phase, p.done, p.total) for p in emitted] == (
        [("pads", i, groups) for i in range(1, groups + 1)] + [("prefill", i, groups) for i in range(1, groups + 1)])
    assert pieces and assistant.client.on_group is None and assistant.client.on_pads is None


def test_what_the_server_received_is_shown_beside_the_clients_x(stack):
    """The answer's picture of one group of its last token: for pads, the online message's
    values are x plus a one-time pad (spread over the whole modulus, whatever x is); for bfv,
    ciphertext bytes (spread over 0..255). What they show is measured in test_server_view."""
    for model, meaning in (("legal", "one-time pad"), ("clinic", "bytes")):
        body = {"model": model, "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0}
        view = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=60).json()["privlora"]["server_view"]
        received, activation = view["received"], view["activation"]
        assert meaning in received["meaning"] and view["rows"] == 1 and view["message_bytes"] > 0
        assert len(received["strip"]) == 64 and len(received["histogram"]) == 16
        assert sum(received["histogram"]) == pytest.approx(1.0, abs=1e-3)
        assert max(received["histogram"]) < 0.2  # spread out: uniform would be 1/16 per bin
        assert activation["count"] == 64 and len(activation["strip"]) == 64  # the tiny model's d_in


def test_one_log_line_per_answer_with_its_figures(stack):
    before = len(stack["gateway"].answers())
    body = {"model": "legal", "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0}
    answer = httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=60).json()
    logged = stack["gateway"].wait_for_answers(before + 1)[before]
    cost = answer["privlora"]
    assert logged["model"] == "legal" and logged["finish"] == "length"
    assert int(logged["prompt_tokens"]) == answer["usage"]["prompt_tokens"]
    assert int(logged["completion_tokens"]) == TOKENS
    for field, value in (("first_token_s", cost["first_token_s"]), ("online_s", cost["online"]["seconds"]),
                         ("offline_s", cost["offline"]["seconds"])):
        assert float(logged[field]) == pytest.approx(value, abs=0.0006), field
    assert float(logged["tokens_per_s"]) == pytest.approx(cost["tokens_per_second"], abs=0.06)


def test_a_client_that_goes_away_stops_the_answer(stack, expected):
    """The stream is cut after its first words: the gateway stops generating after the current
    token (logged as cancelled, far short of max_tokens), holds the model until it has, and the
    next answer is whole and right."""
    gateway = stack["gateway"]
    before = len(gateway.answers())
    body = {"model": "clinic", "messages": QUESTION, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():  # up to the first words
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
    logged = gateway.wait_for_answers(before + 1)[before]
    assert logged["finish"] == "cancelled" and int(logged["completion_tokens"]) < 50, logged  # whole: 110
    assert float(logged["online_s"]) > 0  # logged once the worker had stopped: its steps are counted
    answer = httpx.post(stack["url"] + "/v1/chat/completions", timeout=60,
                        json={**body, "stream": False, "max_tokens": TOKENS}).json()
    assert answer["choices"][0]["message"]["content"] == expected["clinic"]
