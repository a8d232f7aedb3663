"""peft adapters attached to the traceable model: parity with peft, and clear rejections."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from conftest import step_inputs, write_tiny_adapter
from privlora.errors import AdapterError
from privlora.models.lora import LoraLinear, read_adapter
from privlora.models.loading import load_model

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_logits(base_dir, adapter_dir, input_ids):
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids).logits


def our_logits(base_dir, adapter_dir, input_ids):
    model = load_model(base_dir, adapter_dir).model
    with torch.no_grad():
        return model(input_ids, *step_inputs(input_ids), *model.empty_cache(input_ids.shape[0]))[0]


@pytest.mark.parametrize(
    ("targets", "options"),
    [(["q_proj", "v_proj"], {}), (ALL_PROJECTIONS, {}), (["v_proj", "down_proj"], {"use_rslora": True})],
)
def test_adapted_logits_match_peft(tiny_llama, tmp_path, targets, options):
    adapter = write_tiny_adapter(tiny_llama, tmp_path / "adapter", targets, **options)
    input_ids = torch.randint(0, 160, (2, 8))
    reference = peft_logits(tiny_llama, adapter, input_ids)
    base_only = our_logits(tiny_llama, None, input_ids)
    assert (reference - base_only).abs().max() > 1e-2  # the adapter changes the output
    assert (our_logits(tiny_llama, adapter, input_ids) - reference).abs().max() < 1e-4


def test_sites_keep_huggingface_names(tiny_llama, tmp_path):
    adapter = write_tiny_adapter(tiny_llama, tmp_path / "adapter", ["q_proj", "v_proj"], rank=2, alpha=6)
    loaded = load_model(tiny_llama, adapter)
    assert loaded.lora_sites == sorted(
        f"model.layers.{i}.self_attn.{name}" for i in range(3) for name in ("q_proj", "v_proj"))
    module = loaded.model.get_submodule("model.layers.1.self_attn.v_proj")
    assert isinstance(module, LoraLinear) and module.scaling == 3.0
    names = dict(loaded.model.named_parameters())
    assert "model.layers.1.self_attn.v_proj.lora_A.weight" in names
    assert "model.layers.1.self_attn.v_proj.base_layer.weight" in names
    traced = torch.fx.symbolic_trace(loaded.model)
    targets = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert "model.layers.1.self_attn.v_proj.lora_B" in targets


def _edit_config(adapter, **changes):
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"bias": "lora_only"}, "biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_unsupported_adapter_features_are_rejected(tiny_llama, tmp_path, changes, message):
    adapter = write_tiny_adapter(tiny_llama, tmp_path / "adapter", ["q_proj"])
    _edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        load_model(tiny_llama, adapter)


def test_modules_the_architecture_lacks_are_rejected(tiny_llama, tmp_path):
    adapter = write_tiny_adapter(tiny_llama, tmp_path / "adapter", ["q_proj"])
    _edit_config(adapter, target_modules=["query_key_value"])
    with pytest.raises(AdapterError, match="query_key_value"):
        load_model(tiny_llama, adapter)


def test_adapter_for_another_shape_is_rejected(tiny_llama, tmp_path):
    from conftest import write_tiny_llama

    other = write_tiny_llama(tmp_path / "wide", hidden_size=96, head_dim=24)
    adapter = write_tiny_adapter(other, tmp_path / "adapter", ["q_proj"])
    with pytest.raises(AdapterError, match="q_proj is 64->64"):
        load_model(tiny_llama, adapter)


def test_broken_adapter_directories_fail_clearly(tiny_llama, tmp_path):
    with pytest.raises(AdapterError, match="not a peft adapter directory"):
        read_adapter(tmp_path)
    adapter = write_tiny_adapter(tiny_llama, tmp_path / "adapter", ["q_proj"])
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="cannot read weights"):
        read_adapter(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has none of"):
        read_adapter(adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(adapter)


def test_delta_weight_is_scaled_product(tiny_llama, tmp_path):
    adapter = read_adapter(write_tiny_adapter(tiny_llama, tmp_path / "adapter", ["q_proj"], rank=4, alpha=2))
    site = adapter.sites[0]
    assert adapter.scaling == 0.5 and site.rank == 4
    assert torch.allclose(site.delta_weight(), 0.5 * site.lora_B @ site.lora_A)
