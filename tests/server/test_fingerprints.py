"""Per-account fingerprints: a clone fitted on an account's answers carries that account's secret
term, and the owner's trace names it; innocent accounts are not named. (That they leave greedy
answers unchanged is checked on SmolLM2 in tests/e2e/test_fingerprints_smollm2.py: a tiny random
model's near-tied logits flip on any change.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privlora.client.generation import GenerationConfig, generate
from privlora.client.secure import SecureClient
from privlora.client.transcript import load_transcript
from privlora.errors import PrivloraError
from privlora.local import InProcessTransport
from privlora.server.accounts import AccountStore
from privlora.server.fingerprints import RECOMMENDED_STRENGTH
from privlora.server.private import PrivateServer
from privlora.tools.clone import clone_adapter, fit_transcript, write_adapter
from privlora.tools.trace import named, trace

ACCOUNTS = [f"user{i}" for i in range(12)]
PROMPTS = [np.random.default_rng(seed).integers(3, 150, size=24).tolist() for seed in range(6)]
CONFIG = GenerationConfig(max_new_tokens=8)


def accounts_db(path: Path, strength: float) -> tuple[AccountStore, dict[str, str]]:
    store = AccountStore(path, create=True)
    store.set_fingerprint_strength(strength)
    return store, {name: store.create(name) for name in ACCOUNTS}


def answers(artifact: Path, server: PrivateServer, token: str, record: Path | None = None) -> list[list[int]]:
    client = SecureClient(artifact, InProcessTransport(server, token), cache_keys=False)
    if record is not None:
        client.record(record)
    outputs = [list(generate(client, prompt, CONFIG)) for prompt in PROMPTS]
    if client.recorder is not None:
        client.recorder.save()
    client.close()
    return outputs


def clone_of(transcript: Path, out: Path, base: Path) -> Path:
    return write_adapter(clone_adapter(fit_transcript(load_transcript(transcript)), out), str(base))


@pytest.mark.parametrize("backend", ["pads", "bfv"])
def test_a_clone_names_the_account_whose_answers_it_was_fitted_on(tiny_build, tmp_path, backend):
    artifact = tiny_build.artifact(backend)
    store, tokens = accounts_db(tmp_path / "accounts.db", RECOMMENDED_STRENGTH)
    answers(artifact, PrivateServer(artifact, accounts=store), tokens["user7"], tmp_path / "t")
    suspect = clone_of(tmp_path / "t", tmp_path / "clone", tiny_build.base)
    scores = trace(artifact, suspect, store.fingerprint_key(), ACCOUNTS, null_draws=100)
    found = named(scores)
    assert found is not None and found.account == "user7"
    assert found.carried == pytest.approx(1.0, abs=0.05) and found.p_value * len(ACCOUNTS) < 1e-6
    # No innocent account comes near: under the null, one would pass this line with chance 1e-4 per
    # run (the Bonferroni bound); at the naming line, 0.01, it would be 1 run in 100 (seen in CI).
    assert all(score.p_value * len(ACCOUNTS) > 1e-4 for score in scores[1:])


def test_control_a_clone_from_a_server_without_fingerprints_names_no_one(tiny_build, tmp_path):
    artifact = tiny_build.artifact("pads")
    store, tokens = accounts_db(tmp_path / "accounts.db", 0.0)
    answers(artifact, PrivateServer(artifact, accounts=store), tokens["user7"], tmp_path / "t")
    suspect = clone_of(tmp_path / "t", tmp_path / "clone", tiny_build.base)
    with pytest.raises(PrivloraError, match="fingerprints are off"):
        trace(artifact, suspect, store.fingerprint_key(), ACCOUNTS)
    store.set_fingerprint_strength(RECOMMENDED_STRENGTH)  # turned on later: the old clone carries none of them
    assert named(trace(artifact, suspect, store.fingerprint_key(), ACCOUNTS, null_draws=100)) is None


def test_backends_without_fingerprints_serve_accounts_unmarked(tiny_build, tmp_path):
    artifact = tiny_build.artifact("plain")
    store, _ = accounts_db(tmp_path / "accounts.db", RECOMMENDED_STRENGTH)
    assert PrivateServer(artifact, accounts=store).fingerprint_key is None
    with pytest.raises(PrivloraError, match="fingerprints are added by"):
        trace(artifact, tmp_path, store.fingerprint_key(), ACCOUNTS)


def test_the_owner_is_told_the_clone_point_at_start_and_in_the_help(capsys):
    from privlora.cli.main import build_parser
    from privlora.server.fingerprints import CLONE_ROWS, FingerprintKey
    from privlora.server.http import what_accounts_rebuild

    off, on = (what_accounts_rebuild(FingerprintKey(b"k" * 32, strength)) for strength in (0.0, RECOMMENDED_STRENGTH))
    assert f"about {CLONE_ROWS} rows per LoRA site" in off and "fingerprints off" in off and "fingerprints on" in on
    with pytest.raises(SystemExit):
        build_parser().parse_args(["accounts", "create", "--help"])
    assert f"about {CLONE_ROWS} rows per site" in " ".join(capsys.readouterr().out.split())
