"""``privlora inspect``: what an artifact contains, for people (a report) and machines (JSON).

It reads the manifest only (and verifies every file's hash), so it works in any install role."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privlora.core.artifact import CLIENT, IR, SERVER, ArtifactError, load_bundle, read_manifest


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def present_bundles(root: Path) -> list[str]:
    """The bundles this copy holds: a deployment keeps the manifest and its own bundle only."""
    return [bundle for bundle in (CLIENT, SERVER, IR) if (Path(root) / bundle).is_dir()]


def summary(root: Path) -> dict[str, Any]:
    """The facts ``inspect`` shows, as a JSON-ready dict."""
    manifest = read_manifest(root)
    for bundle in present_bundles(root):  # every file's hash: a damaged one is named
        load_bundle(root, bundle)
    files = manifest["files"]
    segments = []
    for segment in manifest["segments"]:
        segments.append({"name": segment["name"], "inputs": len(segment["inputs"]), "outputs": len(segment["outputs"]),
                         "onnx_nodes": sum(segment["op_counts"].values()), "op_counts": segment["op_counts"],
                         "bytes": files[segment["file"]]["bytes"]})
    bundles = {bundle: {"files": sum(e["bundle"] == bundle for e in files.values()),
                        "bytes": sum(e["bytes"] for e in files.values() if e["bundle"] == bundle)}
               for bundle in (CLIENT, SERVER)}
    model = manifest["model"]
    groups = sum(len(r["plls"]) for r in manifest["rounds"])
    return {
        "artifact": str(root), "format_version": manifest["format_version"],
        "privlora_version": manifest["privlora_version"],
        "base": {"name": manifest["base"]["name"], **model},
        "adapter": {k: manifest["adapter"][k] for k in ("name", "rank", "alpha", "target_modules")},
        "backend": manifest["backend"],
        "sites": len(manifest["sites"]),
        "pll_nodes": groups,
        "rounds_per_step": len(manifest["rounds"]),
        "messages_per_step": groups * manifest["backend"]["messages"],
        "segments": segments,
        "bundles": bundles,
        "present": present_bundles(root),
    }


def render(info: dict[str, Any]) -> str:
    base, adapter = info["base"], info["adapter"]
    lines = [
        f"artifact   {info['artifact']} (format {info['format_version']}, privlora {info['privlora_version']})",
        f"base       {base['name']} ({base['architecture']}, {base['layers']} layers, hidden {base['hidden_size']}, "
        f"{base['heads']} heads / {base['kv_heads']} KV heads, vocab {base['vocab_size']}, "
        f"context {base['context_length']})",
        f"adapter    {adapter['name']} (r={adapter['rank']}, alpha={adapter['alpha']}, "
        f"targets {', '.join(adapter['target_modules'])})",
        f"backend    {info['backend']['name']} {json.dumps(info['backend']['parameters'])}",
        f"sites      {info['sites']} LoRA sites in {info['pll_nodes']} PLL nodes",
        f"rounds     {info['rounds_per_step']} client<->server rounds and {info['messages_per_step']} messages "
        "per step (prefill or decode)",
        f"segments   {len(info['segments'])} public ONNX segments",
        f"  {'name':<10} {'in':>3} {'out':>4} {'nodes':>6} {'size':>9}  top ops",
    ]
    for segment in info["segments"]:
        top = ", ".join(f"{op} {n}" for op, n in list(segment["op_counts"].items())[:4])
        lines.append(f"  {segment['name']:<10} {segment['inputs']:>3} {segment['outputs']:>4} "
                     f"{segment['onnx_nodes']:>6} {_megabytes(segment['bytes']):>9}  {top}")
    for bundle, totals in info["bundles"].items():
        here = "verified" if bundle in info["present"] else "not in this copy"
        lines.append(f"{bundle:<10} {totals['files']} files, {_megabytes(totals['bytes'])} ({here})")
    return "\n".join(lines)


def ir_listing(root: Path, name: str | None) -> str:
    """The per-pass summary of the IR dumps, or one dump (by pass name or file stem) in full."""
    directory = Path(root) / IR
    if not directory.is_dir():
        read_manifest(root)
        raise ArtifactError(f"{root} has no IR dumps ({IR}/)")
    load_bundle(root, IR)  # verifies every dump against the manifest
    if name is None:
        rows = json.loads((directory / "summary.json").read_text())
        header = (f"{'#':>2} {'pass':<18} {'nodes':>6} {'public':>7} {'private':>8} {'pll':>4} {'sites':>6} "
                  f"{'rounds':>7} {'ms':>8}")
        body = [f"{r['index']:>2} {r['pass']:<18} {r['nodes']:>6} {r['public_nodes']:>7} {r['private_nodes']:>8} "
                f"{r['pll_nodes']:>4} {r['sites']:>6} {_or_dash(r['rounds']):>7} "
                f"{_or_dash(None if r['seconds'] is None else round(1000 * r['seconds'], 1)):>8}" for r in rows]
        info = summary(root)
        steps = (f"per step: {info['rounds_per_step']} rounds, {info['messages_per_step']} messages "
                 f"({info['backend']['name']}, {info['backend']['messages']} per group)")
        return "\n".join([header, *body, steps, f"(dumps in {directory}; show one with --ir PASS)"])
    matches = sorted(p for p in directory.glob("*.txt") if p.stem == name or p.stem.split("-", 1)[1] == name)
    if not matches:
        available = ", ".join(sorted(p.stem for p in directory.glob("*.txt")))
        raise ArtifactError(f"no IR dump named {name!r} (available: {available})")
    return matches[-1].read_text()
