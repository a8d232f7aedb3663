"""The clone attack: a client's transcript of ordinary use rebuilds each site's map by least
squares, written as a peft adapter that transformers + peft load."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel

from privlora.client.transcript import Recorder, SiteRows, TranscriptError, load_transcript
from privlora.core.types import GroupSpec, PLLSite
from privlora.tools.clone import CloneError, clone_adapter, fit_site, fit_transcript, write_adapter

D_IN, D_OUT, RANK = 64, 48, 4


def synthetic_site(rows: int, seed: int = 0, module: str = "model.layers.0.self_attn.q_proj") -> tuple[SiteRows, np.ndarray]:
    """Rows of a known rank-4 map, inputs correlated as activations are (a decaying spectrum)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((D_OUT, RANK)) @ rng.standard_normal((RANK, D_IN)) / 10
    x = rng.standard_normal((rows, D_IN)) * np.geomspace(3, 0.05, D_IN)
    return SiteRows(module, x.astype(np.float32), (x @ weight.T).astype(np.float32)), weight


def fresh_error(weight: np.ndarray, estimate: np.ndarray, seed: int = 9) -> float:
    x = np.random.default_rng(seed).standard_normal((200, D_IN))
    return float(np.linalg.norm(x @ (estimate - weight).T) / np.linalg.norm(x @ weight.T))


def test_enough_rows_recover_a_known_map_exactly():
    rows, weight = synthetic_site(3 * D_IN)
    fit = fit_site(rows)
    assert fit.determined and fit.span == D_IN
    assert fresh_error(weight, fit.weight) < 1e-5  # float32 rows: exact to their precision


def test_control_too_few_rows_are_reported_underdetermined_and_miss_the_map():
    rows, weight = synthetic_site(D_IN // 2)
    fit = fit_site(rows)
    assert not fit.determined and fit.span == D_IN // 2
    assert fresh_error(weight, fit.weight) > 1e-3


def test_ridge_and_rank_truncation_are_options():
    rows, weight = synthetic_site(3 * D_IN)
    assert fresh_error(weight, fit_site(rows, "ridge", ridge=1e-6).weight) < 1e-3
    truncated = fit_site(rows, rank=RANK).weight
    assert np.linalg.matrix_rank(truncated, tol=1e-6) == RANK and fresh_error(weight, truncated) < 1e-5
    with pytest.raises(CloneError, match="unknown fit"):
        fit_site(rows, "magic")


def test_the_clone_is_a_peft_adapter_that_peft_loads(tiny_build, tmp_path):
    config = transformers.AutoConfig.from_pretrained(tiny_build.base)
    d_in, q_out = config.hidden_size, config.num_attention_heads * config.head_dim
    rng = np.random.default_rng(1)
    truth = {f"model.layers.{i}.self_attn.q_proj": rng.standard_normal((q_out, d_in)) / 10
             for i in range(config.num_hidden_layers)}
    x = rng.standard_normal((3 * d_in, d_in))
    fits = fit_transcript([SiteRows(m, x.astype(np.float32), (x @ w.T).astype(np.float32)) for m, w in truth.items()])
    written = write_adapter(clone_adapter(fits, tmp_path / "clone"), str(tiny_build.base))

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_build.base)
    loaded = PeftModel.from_pretrained(base, str(written))
    layers = dict(loaded.named_modules())
    for module, weight in truth.items():
        layer = layers[f"base_model.model.{module}"]
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        assert torch.allclose(delta.double(), torch.from_numpy(weight), atol=1e-4)


def test_a_recorder_keeps_each_step_once_and_splits_fused_groups(tmp_path):
    sites = (PLLSite(0, "m.q_proj", 8, 6, 2, 1.0), PLLSite(1, "m.v_proj", 8, 3, 2, 1.0))
    group = GroupSpec("round_0", 0, 0, 0, sites)
    recorder = Recorder(tmp_path / "t", [group])
    x, delta = np.ones((1, 5, 8)), np.arange(45.0).reshape(1, 5, 9)
    recorder.observe(group, x, delta)
    recorder.discard_step()  # a step redone after a fault
    recorder.observe(group, x, delta)
    recorder.commit()
    recorder.save()
    recorder.observe(group, x[:, :2], delta[:, :2])
    recorder.commit()
    recorder.save()
    loaded = {site.module: site for site in load_transcript(tmp_path / "t")}
    assert loaded["m.q_proj"].rows == 7 and loaded["m.v_proj"].delta.shape == (7, 3)
    assert np.array_equal(loaded["m.v_proj"].delta[:5], delta[0, :, 6:])
    assert load_transcript(tmp_path / "t", max_rows=3)[0].rows == 3
    with pytest.raises(TranscriptError, match="not a transcript"):
        load_transcript(tmp_path)


def test_generate_records_and_attack_clone_fits_through_the_cli(tiny_build, tmp_path):
    """The commands a user runs: generate --record, twice (parts add up), then attack clone."""
    artifact = tiny_build.artifact("pads")
    cli = [sys.executable, "-m", "privlora.cli"]
    for prompt in ("hello there", "what is the time"):
        done = subprocess.run([*cli, "generate", str(artifact), "--prompt", prompt, "--max-new-tokens", "4",
                               "--record", str(tmp_path / "t"), "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    sites = load_transcript(tmp_path / "t")
    assert sites and all(site.rows > 20 for site in sites)
    done = subprocess.run([*cli, "attack", "clone", str(tmp_path / "t"), "-o", str(tmp_path / "clone"),
                           "--base", str(tiny_build.base)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "underdetermined at" in done.stdout  # fewer rows than the tiny model's 64 input dimensions
    assert (tmp_path / "clone" / "adapter_config.json").is_file()
