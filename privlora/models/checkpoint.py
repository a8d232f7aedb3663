"""Local Hugging Face checkpoint directories: ``config.json`` plus safetensors (single file or
sharded with an index) or a PyTorch ``.bin``. Nothing is ever fetched from a hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from torch import Tensor, nn
from transformers.modeling_utils import no_init_weights

from privlora.errors import PrivloraError, UnsupportedModelError
from privlora.files import read_json
from privlora.models.registry import architecture

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def read_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``; a clear error when the directory is not a checkpoint."""
    return read_json(Path(path) / "config.json", PrivloraError,
                     f"{path} is not a local checkpoint directory (no config.json); "
                     "privlora loads local files only and never downloads from a hub")


def weight_files(path: Path) -> list[Path]:
    """The files holding the checkpoint's tensors, in load order."""
    path = Path(path)
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    if (path / SAFETENSORS_INDEX).is_file():
        index = read_json(path / SAFETENSORS_INDEX, PrivloraError, f"missing {SAFETENSORS_INDEX}")
        return [path / name for name in sorted(set(index["weight_map"].values()))]
    if (path / TORCH_BIN).is_file():
        return [path / TORCH_BIN]
    raise PrivloraError(f"{path} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")


def read_tensors(file: Path) -> dict[str, Tensor]:
    """All tensors of one safetensors or PyTorch file (the latter without unpickling code)."""
    if not file.is_file():
        raise PrivloraError(f"missing weight file {file}")
    try:
        if file.suffix == ".safetensors":
            # Read into memory rather than mmap: a file replaced while tensors are alive would
            # otherwise crash the process with SIGBUS.
            return safetensors_load(file.read_bytes())
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise several unrelated types for bad files
        raise PrivloraError(f"cannot read weights from {file}: {exc}") from None


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint, as float32."""
    state: dict[str, Tensor] = {}
    for file in weight_files(path):
        state.update(read_tensors(file))
    return {name: tensor.float() for name, tensor in state.items()}


def load_weights(model: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """Strict load that names the missing and unexpected parameters instead of dumping a trace."""
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights in {source} do not match the architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in model.state_dict().items():
        if tensor.shape != state[name].shape:
            raise UnsupportedModelError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def build_model(path: Path) -> nn.Module:
    """Instantiate the checkpoint's architecture and load its weights, in eval mode, frozen."""
    hf_config = read_config(path)
    arch = architecture(hf_config.get("model_type"))
    with no_init_weights():  # every parameter is overwritten below; random init costs seconds
        model = arch.build(hf_config)
    load_weights(model, arch.adapt_state_dict(model, load_state_dict(path)), Path(path))
    model.eval().requires_grad_(False)
    return model
