"""``privlora compile``: base model + adapter -> artifact directory.

Phases, each told on one line as it ends (redrawn in place while it runs on a terminal): load ->
trace and run the passes -> record each segment's arguments on the sample steps -> lower the
public segments to ONNX -> lower the private rounds to the backend -> write the bundles and the
manifest with hashes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file as save_numpy
from torch.fx import GraphModule

import privlora
from privlora import backends
from privlora.progress import Phases
from privlora.backends import DEFAULT_BACKEND
from privlora.compiler.frontend import sample_steps
from privlora.compiler.instruments import PassCount
from privlora.compiler.ir import PrivateLinear
from privlora.compiler.lower_onnx import LoweredSegment, lower_segment, segment_arguments
from privlora.compiler.pipeline import DEFAULT_PASSES, compile_graph
from privlora.core.artifact import CLIENT, CRYPTO, IR, SERVER, SERVER_PROGRAM, TOKENIZER_DIR, ArtifactError, write_manifest
from privlora.core.plan import PRIVATE, PUBLIC, Plan
from privlora.core.types import groups_from_rounds
from privlora.files import file_sha256
from privlora.models.checkpoint import read_config, weight_files
from privlora.models.loading import load_model
from privlora.models.registry import describe

@dataclass(frozen=True)
class CompileReport:
    artifact: Path
    seconds: float
    sites: int
    rounds: int
    segments: int
    client_bytes: int
    server_bytes: int


def round_programs(split: GraphModule, plan: Plan) -> tuple[list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Each round's PLL groups (which input feeds which output, with the site metadata) and the
    float LoRA weights (A, B) of every site, by site id."""
    rounds, weights = [], {}
    for step in (s for s in plan.steps if s.kind == PRIVATE):
        module = split.get_submodule(step.name)
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        result = next(n for n in module.graph.nodes if n.op == "output").args[0]
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        groups = []
        for node in module.graph.nodes:
            if node.op != "call_module":
                continue
            pll: PrivateLinear = module.get_submodule(node.target)
            groups.append({"input": placeholders.index(node.args[0]), "output": results.index(node),
                           "sites": [asdict(site) for site in pll.sites]})
            for site, a, b in zip(pll.sites, pll.lora_A, pll.lora_B):
                weights[site.site_id] = (a.detach().numpy(), b.detach().numpy())
        rounds.append({"name": step.name, "plls": groups})
    return rounds, weights


def _segment_entry(segment: LoweredSegment, root: Path) -> dict[str, Any]:
    return {"name": segment.name, "file": segment.path.relative_to(root).as_posix(),
            "inputs": [asdict(spec) for spec in segment.inputs], "outputs": [asdict(spec) for spec in segment.outputs],
            "op_counts": segment.op_counts, "onnx_vs_torch_max_error": segment.max_error}


def _prepare_output(output: Path, force: bool) -> bool:
    """An empty directory at ``output``; whether it existed before (then a failed compile empties
    it, else it removes it)."""
    existed = output.exists()
    if existed and any(output.iterdir()):
        if not force:
            raise ArtifactError(f"{output} exists and is not empty (use --force to replace it)")
        shutil.rmtree(output)
        existed = False
    output.mkdir(parents=True, exist_ok=True)
    return existed


def _remove_written(output: Path, existed: bool) -> None:
    if not existed:
        shutil.rmtree(output, ignore_errors=True)
        return
    for entry in output.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def compile_artifact(base: str, adapter: str | Path, output: str | Path, backend: str = DEFAULT_BACKEND,
                     dump_ir: Path | None = None, debug: bool = False, force: bool = False,
                     backend_options: dict[str, Any] | None = None, quiet: bool = False) -> CompileReport:
    """Compile base + adapter into an artifact directory at ``output``, telling each phase on
    stderr unless ``quiet``. A compile that fails (or is interrupted) removes what it wrote, so
    that a retry needs no ``--force``."""
    backends.load(backend)  # fail before any work on an unknown name
    output = Path(output)
    existed = _prepare_output(output, force)
    phases = Phases("compile", None if quiet else sys.stderr)
    try:
        return _compile_into(base, adapter, output, backend, dump_ir, debug, backend_options or {}, phases)
    except BaseException:
        _remove_written(output, existed)
        raise


def _compile_into(base: str, adapter: str | Path, output: Path, backend: str, dump_ir: Path | None, debug: bool,
                  backend_options: dict[str, Any], phases: Phases) -> CompileReport:
    start = time.perf_counter()
    inputs = f"{Path(str(base)).name} + {Path(adapter).name}"
    with phases.phase(f"loading {inputs}", f"loaded {inputs}"):
        loaded = load_model(base, adapter)
    passes = len(DEFAULT_PASSES)
    with phases.phase(f"tracing and running {passes} passes", f"traced and ran {passes} passes",
                      passes, "passes") as phase:
        compiled = compile_graph(loaded.model, dump_ir=output / IR, debug=debug, observers=[PassCount(phase.advance)])
        if dump_ir is not None:
            shutil.copytree(output / IR, dump_ir, dirs_exist_ok=True)
    split, plan = compiled.graph_module, compiled.analyses.plan
    with phases.phase("recording each segment's arguments on the sample steps",
                      "recorded each segment's arguments on the sample steps"):
        arguments = segment_arguments(split, sample_steps(loaded.model))
    public = [s for s in plan.steps if s.kind == PUBLIC]
    with phases.phase(f"lowering {len(public)} public segments to ONNX",
                      f"lowered {len(public)} public segments to ONNX", len(public), "segments") as phase:
        segments = []
        for step in public:
            path = output / CLIENT / "segments" / f"{step.name}.onnx"
            segments.append(lower_segment(split.get_submodule(step.name), step.name,
                                          [args[step.name] for args in arguments], path))
            phase.advance()
    with phases.phase(f"lowering {plan.rounds} private rounds to {backend}",
                      f"lowered {plan.rounds} private rounds to {backend}"):
        rounds, weights = round_programs(split, plan)
        build = backends.load(backend).compile(groups_from_rounds(rounds), weights, backend_options)
    with phases.phase("writing the bundles and manifest", "wrote the bundles and manifest"):
        (output / SERVER).mkdir(parents=True, exist_ok=True)
        save_numpy({name: np.ascontiguousarray(t) for name, t in build.server_tensors.items()},
                   str(output / SERVER_PROGRAM))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(output / TOKENIZER_DIR))
        (output / CRYPTO).write_text(json.dumps(build.client_params, indent=2) + "\n")
        config = read_config(loaded.base_path)
        manifest = {
            "privlora_version": privlora.__version__,
            "base": {"name": str(base), "model_type": config.get("model_type"), "config": config,
                     "sha256": {p.name: file_sha256(p) for p in weight_files(loaded.base_path)}},
            "adapter": {"name": Path(adapter).name, "rank": loaded.adapter.rank, "alpha": loaded.adapter.alpha,
                        "target_modules": list(loaded.adapter.target_modules),
                        "sha256": {p.name: file_sha256(p) for p in sorted(Path(adapter).iterdir()) if p.is_file()}},
            # The runtime and inspect know no architecture: they read the base model's shape here.
            "model": asdict(describe(config)),
            "backend": {"name": backend, "parameters": build.public_params, "messages": build.messages},
            "plan": plan.to_json(),
            "segments": [_segment_entry(segment, output) for segment in segments],
            "rounds": rounds,
            "sites": [asdict(site) for site in compiled.analyses.sites],
            "schedule": compiled.analyses.schedule.to_json(),
        }
        write_manifest(output, manifest)
    sizes = {bundle: sum(p.stat().st_size for p in (output / bundle).rglob("*") if p.is_file())
             for bundle in (CLIENT, SERVER)}
    return CompileReport(output, time.perf_counter() - start, len(compiled.analyses.sites), plan.rounds,
                         len(segments), sizes[CLIENT], sizes[SERVER])
