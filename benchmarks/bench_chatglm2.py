"""Paper-scale benchmark: secure generation with a ChatGLM2-6B-shaped model through the real
runtime (``privlora serve`` on loopback, ``SecureClient`` over HTTP, CKKS).

The private part is exactly ChatGLM2-6B's: 28 layers, hidden 4096, 32 heads with 2 key/value
groups (query_key_value 4096 -> 4608), LoRA r = 8 (alpha 16) on query_key_value, random weights.
The public part is thinned where it does not touch the private part, so that it fits this
24 GiB machine: ``--ffn`` (default 256, ChatGLM2-6B: 13696) and ``--vocab`` (default 4096,
ChatGLM2-6B: 65024). The whole 6B model in float32 would need 25 GB for its weights alone.

    python benchmarks/bench_chatglm2.py [--layers 28] [--ffn 256] [--vocab 4096] [--tokens 4]

Prints the per-step timing table. The private part of a decode step is encrypt + server
(HTTP + evaluation) + decrypt; the script also prints the evaluation-key size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from privlora.compiler.driver import compile_artifact
from privlora.tools.loadtest import wait_for_server
from privlora.models.architectures import chatglm2
from privlora.client.secure import SecureClient
from privlora.client.timings import render_timings
from privlora.client.generation import GenerationConfig, generate
from privlora.client.transports import HttpTransport
from privlora.tools.machine import report_machine

PAPER_SECONDS_PER_TOKEN = 1.61


def write_checkpoint(directory: Path, layers: int, ffn: int, vocab: int, seed: int = 0) -> Path:
    config = {"model_type": "chatglm", "num_layers": layers, "hidden_size": 4096, "ffn_hidden_size": ffn,
              "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
              "multi_query_group_num": 2, "padded_vocab_size": vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True,
              "add_qkv_bias": True, "add_bias_linear": False, "post_layer_norm": True, "original_rope": True,
              "apply_residual_connection_post_layernorm": False, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in chatglm2.build(config).state_dict().items()}
    state = {name: (torch.ones(shape) if name.endswith("layernorm.weight") else torch.randn(shape) * 0.02)
             for name, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state, str(directory / "model.safetensors"))
    return directory


def write_adapter(directory: Path, layers: int, rank: int = 8, seed: int = 1) -> Path:
    """A peft LoRA adapter on query_key_value, in peft's own file format."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        prefix = f"base_model.model.transformer.encoder.layers.{layer}.self_attention.query_key_value"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 4096, generator=generator) / 64
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(4608, rank, generator=generator) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": ["query_key_value"], "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "use_rslora": False, "modules_to_save": None, "base_model_name_or_path": "chatglm2-6b-shaped"}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def main() -> int:
    report_machine()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--workdir", default=None, help="keep the checkpoint and artifact here")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="privlora-chatglm2-"))
    start = time.perf_counter()
    base = write_checkpoint(work / "base", args.layers, args.ffn, args.vocab)
    adapter = write_adapter(work / "adapter", args.layers)
    report = compile_artifact(str(base), adapter, work / "artifact", backend="ckks", force=True)
    print(f"checkpoint + compile: {time.perf_counter() - start:.0f} s; {report.sites} sites, {report.rounds} rounds, "
          f"client {report.client_bytes / 1e9:.2f} GB, server {report.server_bytes / 1e6:.1f} MB")
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "privlora.cli", "serve", str(report.artifact), "--port",
                               str(args.port), "--log-level", "warning"])
    try:
        wait_for_server(url)
        client = SecureClient(report.artifact, HttpTransport(url), cache_keys=False)
        keys = len(client.crypto.evaluation_keys())
        prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt_length).tolist()
        tokens = list(generate(client, prompt, GenerationConfig(max_new_tokens=args.tokens)))
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    decode = client.steps[1:]
    private = sum(s.encrypt_s + s.server_s + s.decrypt_s for s in decode) / len(decode)
    wire = sum(s.bytes_up + s.bytes_down for s in decode) / len(decode)
    print(render_timings(client.steps))
    print(f"generated {len(tokens)} tokens; evaluation keys {keys / 1e6:.1f} MB (uploaded once per session)")
    print(f"private part of one decode step ({report.rounds} sites, over loopback HTTP): {private:.2f} s/token, "
          f"{wire / 1e6:.1f} MB/token; paper (ChatGLM2-6B, r=8): {PAPER_SECONDS_PER_TOKEN} s/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
