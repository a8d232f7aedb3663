"""Compiler passes on tiny random Llamas with peft adapters: each pass's rewrite, the leak error,
round counts, partition, the pass contract (prerequisites, typed analyses) and the instruments
(numeric check, IR dumps)."""

from __future__ import annotations

import json
import operator

import pytest
import torch

from conftest import write_tiny_adapter
from privlora.compiler.frontend import sample_steps, trace
from privlora.compiler.ir import PRIVACY, PRIVATE, PUBLIC, ROUND, STAGE, PrivateLinear, is_lora_site, pll_nodes
from privlora.compiler.instruments import NumericCheck
from privlora.compiler.pass_manager import (Analyses, CompileError, MissingAnalysisError, PassManager, PrivacyCounts,
                                            RoundSchedule, compiler_pass)
from privlora.compiler.pipeline import DEFAULT_PASSES, compile_graph
from privlora.core.plan import Plan
from privlora.core.types import PLLSite
from privlora.models.loading import load_model
from privlora.models.lora import LoraLinear
from privlora.compiler.passes.annotate_privacy import PrivateWeightLeakError, annotate_privacy
from privlora.compiler.passes.fuse_pll import fuse_pll
from privlora.compiler.passes.lora_to_pll import lora_to_pll
from privlora.compiler.passes.partition import partition
from privlora.compiler.passes.schedule_rounds import schedule_rounds

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3  # conftest.TINY_LLAMA


@pytest.fixture
def adapted(tiny_llama, tmp_path):
    def build(targets):
        return load_model(tiny_llama, write_tiny_adapter(tiny_llama, tmp_path / "-".join(targets), targets)).model
    return build


def run(model, *passes):
    """Run the passes under the numeric check; return the graph and the analyses."""
    analyses = Analyses()
    gm = PassManager(list(passes), [NumericCheck(sample_steps(model))]).run(trace(model), analyses)
    return gm, analyses


def outputs(gm, samples):
    with torch.no_grad():
        return [gm(*sample.args()) for sample in samples]


def test_frontend_keeps_each_lora_site_one_node(adapted):
    gm = trace(adapted(QV))
    sites = [node.target for node in gm.graph.nodes if is_lora_site(gm, node)]
    assert sites == [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ("q_proj", "v_proj")]


def test_annotate_privacy_marks_only_lora_sites_private(adapted):
    gm, analyses = run(adapted(QV), annotate_privacy)
    private = [node for node in gm.graph.nodes if node.meta[PRIVACY] == PRIVATE]
    assert len(private) == 2 * LAYERS and all(is_lora_site(gm, node) for node in private)
    assert analyses.privacy == PrivacyCounts(public=len(gm.graph.nodes) - 2 * LAYERS, private=2 * LAYERS)


def test_private_weight_reaching_public_graph_is_a_compile_error(adapted):
    # Tracing through the LoRA modules exposes A and B as ordinary public-graph operations.
    gm = torch.fx.symbolic_trace(adapted(QV))
    with pytest.raises(PrivateWeightLeakError, match="lora_A.*leak"):
        annotate_privacy.run(gm, Analyses())


def test_a_public_op_reading_an_adapter_tensor_is_a_compile_error(adapted):
    gm = trace(adapted(QV))
    output = next(node for node in gm.graph.nodes if node.op == "output")
    logits = output.args[0][0]
    with gm.graph.inserting_before(output):
        weight = gm.graph.get_attr("model.layers.0.self_attn.q_proj.lora_B.weight")
        leaked = gm.graph.call_function(operator.add, (logits, gm.graph.call_method("sum", (weight,))))
    output.args = ((leaked, *output.args[0][1:]),)
    gm.recompile()
    with pytest.raises(PrivateWeightLeakError, match="q_proj.lora_B.weight.*used by sum"):
        annotate_privacy.run(gm, Analyses())


def test_lora_to_pll_splits_sites_and_removes_lora_modules(adapted):
    model = adapted(QV)
    gm, analyses = run(model, annotate_privacy, lora_to_pll)  # numeric check: outputs unchanged
    assert not any(isinstance(module, LoraLinear) for module in gm.modules())
    plls = pll_nodes(gm)
    assert len(plls) == 2 * LAYERS and all(node.meta[PRIVACY] == PRIVATE for node in plls)
    site = analyses.sites[1]
    assert (site.module, site.d_in, site.d_out, site.rank) == ("model.layers.0.self_attn.v_proj", 64, 32, 4)
    for node in plls:
        (add,) = node.users
        assert add.target is operator.add and add.meta[PRIVACY] == PUBLIC
        base = add.args[0]
        assert base.op == "call_module" and isinstance(gm.get_submodule(base.target), torch.nn.Linear)
        assert base.args == node.args  # the base Linear and the PLL read the same input


def test_fuse_pll_merges_sites_reading_the_same_tensor(adapted):
    gm, analyses = run(adapted(ALL), annotate_privacy, lora_to_pll, fuse_pll)
    assert analyses.fused_groups == [3, 1, 2, 1] * LAYERS  # qkv, o, gate+up, down
    fused = gm.get_submodule(pll_nodes(gm)[0].target)
    assert isinstance(fused, PrivateLinear)
    assert [s.module.rsplit(".", 1)[1] for s in fused.sites] == ["q_proj", "k_proj", "v_proj"]
    assert fused.d_out == 64 + 32 + 32
    assert len(list(gm.get_submodule("pll").children())) == 4 * LAYERS  # replaced modules deleted


@pytest.mark.parametrize(("targets", "per_layer"), [(QV, 1), (["v_proj"], 1), (ALL, 4), (["o_proj", "down_proj"], 2)])
def test_schedule_rounds_counts_dependency_levels(adapted, targets, per_layer):
    gm, analyses = run(adapted(targets), annotate_privacy, lora_to_pll, fuse_pll, schedule_rounds)
    assert analyses.schedule.count == per_layer * LAYERS
    assert all(node.meta[ROUND] >= 0 for node in pll_nodes(gm))
    output = next(node for node in gm.graph.nodes if node.op == "output")
    assert output.meta[STAGE] == per_layer * LAYERS


def test_partition_interleaves_public_segments_and_rounds(adapted):
    compiled = compile_graph(adapted(QV), debug=True)
    steps = compiled.analyses.plan.steps
    assert [step.name for step in steps] == ["public_0", "round_0", "public_1", "round_1", "public_2",
                                             "round_2", "public_3"]
    for step in steps:
        module = compiled.graph_module.get_submodule(step.name)
        has_private = any(isinstance(m, PrivateLinear) for m in module.modules())
        assert has_private == (step.kind == "private")
        if step.kind == "private":
            assert len(step.inputs) == 1 and len(step.outputs) == 1  # one fused message per round
    assert steps[0].inputs == ("position_ids", "attention_mask", "input_ids", "past_keys", "past_values")


def test_partitioned_graph_computes_the_original_model(adapted):
    model = adapted(ALL)
    samples = sample_steps(model, prompt_length=5, seed=3)
    expected = outputs(model, samples)
    actual = outputs(compile_graph(model).graph_module, samples)
    for exp, act in zip(expected, actual):
        for a, b in zip(exp, act):
            assert (a - b).abs().max() < 1e-5


def test_numeric_check_catches_a_pass_that_changes_the_numbers(adapted, tmp_path):
    @compiler_pass(requires={"sites"})
    def break_scaling(gm, analyses):
        for node in pll_nodes(gm):
            gm.get_submodule(node.target).lora_B[0].data.mul_(2.0)
        return gm

    model = adapted(QV)
    with pytest.raises(CompileError, match="pass break_scaling changed output 0 of sample 0"):
        compile_graph(model, dump_ir=tmp_path, debug=True, passes=[annotate_privacy, lora_to_pll, break_scaling])
    assert (tmp_path / "03-break_scaling.txt").is_file()  # dumped before the check failed, to inspect


def test_numeric_check_passes_the_real_pipeline(adapted):
    model = adapted(ALL)
    check = NumericCheck(sample_steps(model, prompt_length=4, seed=5))
    split = PassManager(DEFAULT_PASSES, [check]).run(trace(model), Analyses())
    assert len(check.reference) == 3 and "round_0" in dict(split.named_children())


@pytest.mark.parametrize(("passes", "message"), [
    ([partition], "pass partition requires 'schedule', which no earlier pass provided (run schedule_rounds first)"),
    ([annotate_privacy, fuse_pll], "pass fuse_pll requires 'sites', which no earlier pass provided (run lora_to_pll first)"),
    ([fuse_pll], "pass fuse_pll requires 'privacy', which no earlier pass provided (run annotate_privacy first)"),
    ([annotate_privacy, lora_to_pll, schedule_rounds],
     "pass schedule_rounds requires 'fused_groups', which no earlier pass provided (run fuse_pll first)"),
])
def test_a_pass_without_its_prerequisite_names_both(adapted, passes, message):
    gm = trace(adapted(QV))
    with pytest.raises(MissingAnalysisError) as error:
        PassManager(passes).run(gm, Analyses())
    assert str(error.value) == message


def test_a_prerequisite_may_come_with_the_input(adapted):
    gm, analyses = trace(adapted(QV)), Analyses()
    gm = annotate_privacy.run(gm, analyses)
    gm = PassManager([lora_to_pll, fuse_pll]).run(gm, analyses)
    assert len(analyses.sites) == 2 * LAYERS and analyses.fused_groups == [2] * LAYERS


def test_reading_an_analysis_before_it_exists_names_its_provider(adapted):
    with pytest.raises(MissingAnalysisError, match=r"^'plan' was read before any pass provided it \(run partition first\)$"):
        Analyses().plan

    @compiler_pass()
    def peek(gm, analyses):  # reads an analysis it did not declare
        assert analyses.schedule.count > 0
        return gm

    with pytest.raises(MissingAnalysisError, match=r"^pass peek requires 'schedule', which no earlier pass"):
        PassManager([annotate_privacy, peek]).run(trace(adapted(QV)), Analyses())


def test_a_pass_must_record_what_it_provides(adapted):
    @compiler_pass(provides={"privacy", "plan"})
    def forgetful(gm, analyses):
        return annotate_privacy.run(gm, analyses)

    with pytest.raises(CompileError, match=r"pass forgetful declares it provides \['plan'\] but did not record"):
        PassManager([forgetful]).run(trace(adapted(QV)), Analyses())


def test_a_pass_contract_names_only_known_analyses():
    with pytest.raises(ValueError, match=r"unknown analyses \['rounds'\]; the analyses are \['privacy', 'sites'"):
        compiler_pass(requires={"rounds"})


def test_the_default_pipeline_fills_every_typed_analysis(adapted):
    compiled = compile_graph(adapted(ALL))
    analyses = compiled.analyses
    assert isinstance(analyses.privacy, PrivacyCounts) and analyses.privacy.private == 7 * LAYERS
    assert all(isinstance(site, PLLSite) for site in analyses.sites)
    assert [site.site_id for site in analyses.sites] == list(range(7 * LAYERS))
    assert analyses.fused_groups == [3, 1, 2, 1] * LAYERS
    schedule = analyses.schedule
    assert isinstance(schedule, RoundSchedule) and schedule.count == 4 * LAYERS
    assert schedule.pll_nodes_per_round == [1] * 4 * LAYERS
    assert schedule.members[:2] == (("pll.fused_0_1_2",), ("pll.site_3",))
    assert json.loads(json.dumps(schedule.to_json())) == {
        "count": 4 * LAYERS, "pll_nodes_per_round": [1] * 4 * LAYERS, "members": [list(m) for m in schedule.members]}
    assert isinstance(analyses.plan, Plan) and analyses.plan.rounds == schedule.count


def test_dump_ir_writes_every_pass(adapted, tmp_path):
    compile_graph(adapted(QV), dump_ir=tmp_path / "ir")
    names = sorted(path.name for path in (tmp_path / "ir").iterdir())
    passes = ["00-input", "01-annotate_privacy", "02-lora_to_pll", "03-fuse_pll", "04-schedule_rounds", "05-partition"]
    assert names == sorted([f"{p}.{ext}" for p in passes for ext in ("py", "txt")] + ["summary.json"])
    summary = json.loads((tmp_path / "ir" / "summary.json").read_text())
    by_pass = {entry["pass"]: entry for entry in summary}
    assert by_pass["lora_to_pll"]["sites"] == 2 * LAYERS and by_pass["fuse_pll"]["pll_nodes"] == LAYERS
    assert by_pass["schedule_rounds"]["rounds"] == LAYERS and by_pass["fuse_pll"]["rounds"] is None
    assert by_pass["input"]["seconds"] is None
    assert all(isinstance(by_pass[p.split("-")[1]]["seconds"], float) for p in passes[1:])
    table = (tmp_path / "ir" / "04-schedule_rounds.txt").read_text()
    assert "pll.fused_0_1" in table and "private" in table
