"""One name per hosted model: ``privlora serve --name``, else the artifact's directory, the same in
health, ``GET /v1/models``, the server's log lines and ``privlora models``; names that clash or do
not match the artifacts refused, and a port in use, in one line before any banner. Real
``privlora serve`` processes on loopback, on the session's tiny artifacts (one adapter, two
builds: the manifest calls both "adapter", the names tell them apart)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from privlora.client.secure import SecureClient
from privlora.client.transports import Credentials, HttpTransport
from privlora.core.artifact import ArtifactError, artifact_id
from privlora.server.accounts import AccountStore
from privlora.server.hosting import OPERATOR_FIELDS, Hosting
from privlora.server.private import PrivateServer
from privlora.tools.loadtest import ServerProcess


@pytest.fixture(scope="module")
def artifacts(tiny_build):
    return {"bfv": tiny_build.artifact("bfv"), "pads": tiny_build.artifact("pads")}


@pytest.fixture(scope="module")
def named(artifacts):
    """Two builds of one adapter, named clinic and legal, logging at info (the load lines)."""
    server = ServerProcess([artifacts["bfv"], artifacts["pads"]], "--name", "clinic", "--name", "legal",
                           "--log-level", "info").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded(artifacts, tmp_path_factory):
    """One artifact on a server with accounts, named by its directory; and an account's token."""
    accounts = AccountStore(tmp_path_factory.mktemp("names") / "accounts.db", create=True)
    server = ServerProcess(artifacts["bfv"], "--accounts", str(accounts.path)).start()
    yield server, accounts.create("user")
    server.stop()


def privlora(*argv: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point in its own process, without a token in its environment unless given."""
    env = {key: value for key, value in os.environ.items() if key != "PRIVLORA_TOKEN"}
    return subprocess.run([sys.executable, "-m", "privlora.cli", *argv], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env={**env, **({"PRIVLORA_TOKEN": token} if token else {})})


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr, nothing on stdout: no banner, no traceback, no uvicorn message."""
    assert run.stdout == "" and run.stderr.endswith("\n") and len(run.stderr.splitlines()) == 1, run.stderr
    return run.stderr.removesuffix("\n")


def log_lines(server: ServerProcess, event: str) -> list[dict]:
    entries = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == event]


def test_serve_names_each_model_as_told_in_health_models_and_logs(named, artifacts):
    ids = {kind: artifact_id(path) for kind, path in artifacts.items()}
    health = HttpTransport(named.url).info()
    assert [(a["name"], a["artifact"]) for a in health["artifacts"]] == [("clinic", ids["bfv"]), ("legal", ids["pads"])]
    models = httpx.get(f"{named.url}/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["artifact"], m["backend"]) for m in models["data"]] == [
        ("clinic", "model", ids["bfv"], "bfv"), ("legal", "model", ids["pads"], "pads")]
    for model, described in zip(models["data"], health["artifacts"]):
        assert model["adapter"] == "adapter" and model["base"] == "base" and model["groups"] == described["groups"]
        assert not OPERATOR_FIELDS & model.keys()  # no sessions, no memory, no replica
    client = SecureClient(artifacts["bfv"], HttpTransport(named.url), cache_keys=False)
    client.close()
    assert [(e["model"], e["artifact"]) for e in log_lines(named, "load")] == [("clinic", ids["bfv"][:16]),
                                                                              ("legal", ids["pads"][:16])]
    assert [e["model"] for e in log_lines(named, "open") + log_lines(named, "close")] == ["clinic", "clinic"]
    assert named.output().startswith("privlora server: models clinic, legal on ")  # the banner


def test_privlora_models_prints_a_table_and_json(named, artifacts):
    table = privlora("models", "--server", named.url)
    assert table.returncode == 0 and table.stderr == "", table.stderr
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows == [["NAME", "BACKEND", "ARTIFACT", "ADAPTER"],
                    ["clinic", "bfv", artifact_id(artifacts["bfv"])[:16], "adapter"],
                    ["legal", "pads", artifact_id(artifacts["pads"])[:16], "adapter"]]
    listed = privlora("models", "--server", named.url, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == httpx.get(f"{named.url}/v1/models").json()["data"]


def test_an_artifact_is_named_by_its_directory_by_default(guarded, artifacts):
    server, token = guarded
    health = HttpTransport(server.url, Credentials(token)).info()
    assert [a["name"] for a in health["artifacts"]] == [artifacts["bfv"].name] == ["bfv"]
    assert [m["id"] for m in HttpTransport(server.url, Credentials(token)).models()] == ["bfv"]


def test_models_are_an_accounts_to_read_and_not_a_strangers(guarded):
    server, token = guarded
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer plk_nope"}).status_code == 401
    answer = httpx.get(f"{server.url}/v1/models", headers={"authorization": f"Bearer {token}"})  # control
    assert answer.status_code == 200 and [m["id"] for m in answer.json()["data"]] == ["bfv"]
    missing = privlora("models", "--server", server.url)
    assert missing.returncode == 1
    line = one_line(missing)
    assert line.startswith("privlora: error: ") and "401" in line and "--token" in line and "$PRIVLORA_TOKEN" in line
    for run in (privlora("models", "--server", server.url, "--token", token),
                privlora("models", "--server", server.url, token=token)):
        assert run.returncode == 0 and run.stdout.splitlines()[1].split()[0] == "bfv", run.stderr


def test_names_that_clash_or_miscount_are_refused_before_the_banner(artifacts, tmp_path):
    clash = privlora("serve", str(artifacts["bfv"]), str(artifacts["pads"]), "--name", "a", "--name", "a")
    assert clash.returncode == 2 and "two artifacts would be served as 'a'" in one_line(clash)
    for folder, kind in (("one", "bfv"), ("two", "pads")):  # two directories of one name: a link keeps its own
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clinic").symlink_to(artifacts[kind], target_is_directory=True)
    same = privlora("serve", str(tmp_path / "one" / "clinic"), str(tmp_path / "two" / "clinic"))
    assert same.returncode == 2 and "two artifacts would be served as 'clinic'" in one_line(same)
    short = privlora("serve", str(artifacts["bfv"]), str(artifacts["pads"]), "--name", "clinic")
    assert short.returncode == 2 and "1 --name for 2 artifacts" in one_line(short)
    spaced = privlora("serve", str(artifacts["bfv"]), "--name", "my model")
    assert spaced.returncode == 2 and "without spaces" in one_line(spaced)
    with pytest.raises(ArtifactError, match="same name"):  # the library refuses it too
        Hosting([PrivateServer(artifacts[kind], idle_work=False, name="a") for kind in ("bfv", "pads")])


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_a_port_in_use_is_one_line_before_the_banner(artifacts, command):
    """The port is held by a plain socket; the command says so and exits 1 before it loads the
    artifact (the gateway's in-process server, its keys) or prints its banner."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = privlora(command, str(artifacts["bfv"]), "--port", str(port))
    assert taken.returncode == 1
    assert one_line(taken) == (f"privlora: error: cannot listen on 127.0.0.1:{port}: address already in use "
                               "(pass --port)")
