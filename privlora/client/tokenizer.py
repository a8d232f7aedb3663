"""The client's tokenizer, without torch or transformers.

The client of secure generation installs in megabytes, so it cannot use transformers'
``AutoTokenizer``. This module reads the directory that transformers 4.47.1's
``save_pretrained`` wrote at compile time (``tokenizer.json``, ``tokenizer_config.json``, an
optional ``chat_template.jinja`` and ``special_tokens_map.json``) with the ``tokenizers`` library
and renders chat templates with ``jinja2`` exactly as transformers does, so that prompts encode to
the same token ids and generated ids decode to the same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer
from tokenizers.processors import TemplateProcessing

from privlora.errors import PrivloraError

BACKEND_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (additional_special_tokens is a list).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                      "mask_token", "additional_special_tokens")

# Tokenizer classes whose __init__ rebuilds the post-processor from add_bos_token/add_eos_token,
# with their add_bos_token default (add_eos_token defaults to False in all of them).
BOS_DEFAULT_BY_CLASS = {"LlamaTokenizer": True, "CodeLlamaTokenizer": True, "GemmaTokenizer": True,
                        "CohereTokenizer": True, "GPTNeoXTokenizer": False}

Message = Mapping[str, Any]


@dataclass(frozen=True)
class ClientTokenizer:
    """Chat templating, encoding and decoding that match transformers 4.47.1 token for token."""

    backend: Tokenizer
    special_tokens: dict[str, Any]  # transformers' special_tokens_map: the template's variables
    chat_template: jinja2.Template | None
    clean_up_tokenization_spaces: bool

    def special_token_id(self, key: str) -> int | None:
        """The id of the special token ``key`` (``"eos_token"``, ...), None when it is not set."""
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.special_token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.special_token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.special_token_id("pad_token")

    def chat_prompt(self, conversation: str | Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The chat template applied to a conversation (a plain string is one user turn)."""
        if self.chat_template is None:
            raise PrivloraError("this tokenizer has no chat template; pass --raw to send the prompt as it is")
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
        try:
            return self.chat_template.render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise PrivloraError(f"the chat template rejected the conversation: {exc}") from exc

    def encode_chat(self, conversation: str | Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of :meth:`chat_prompt`; the template writes its own special tokens."""
        return self.encode(self.chat_prompt(conversation, add_generation_prompt), add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of raw text; ``add_special_tokens`` adds what the post-processor adds (a bos)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids, cleaned up as the saved ``clean_up_tokenization_spaces`` asks."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text


def load_client_tokenizer(directory: str | Path) -> ClientTokenizer:
    """The tokenizer saved by transformers' ``save_pretrained`` in ``directory``."""
    root = Path(directory)
    if not (root / BACKEND_FILE).is_file() or not (root / CONFIG_FILE).is_file():
        raise PrivloraError(f"{root} is not a saved tokenizer: it needs {BACKEND_FILE} and {CONFIG_FILE}")
    config = special_token_config(read_json(root / CONFIG_FILE), root / SPECIAL_TOKENS_FILE)
    special_tokens = special_tokens_map(config)
    backend = read_backend(root / BACKEND_FILE)
    add_missing_special_tokens(backend, special_tokens)
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    processor = class_post_processor(backend, special_tokens, config)
    if processor is not None:
        backend.post_processor = processor
    return ClientTokenizer(backend, special_tokens, compile_chat_template(chat_template_source(root, config)),
                           bool(config.get("clean_up_tokenization_spaces", False)))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivloraError(f"cannot read the tokenizer file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise PrivloraError(f"the tokenizer file {path} does not hold a JSON object")
    return data


def read_backend(path: Path) -> Tokenizer:
    """The ``tokenizers`` backend, with the truncation and padding transformers switches off."""
    try:
        backend = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise PrivloraError(f"cannot load the tokenizer file {path}: {exc}") from exc
    backend.no_truncation()
    backend.no_padding()
    return backend


def add_missing_special_tokens(backend: Tokenizer, special_tokens: Mapping[str, Any]) -> None:
    """Add, as transformers does on load, each special token that the backend does not list among
    its added tokens: a new id, or its vocabulary id now treated as special."""
    listed = {token.content for token in backend.get_added_tokens_decoder().values()}
    flat = [token for value in special_tokens.values() for token in (value if isinstance(value, list) else [value])]
    missing = [token for token in dict.fromkeys(flat) if token not in listed]
    if missing:
        backend.add_tokens([AddedToken(token, special=True) for token in missing])


def token_text(value: Any) -> Any:
    """A special token as a string; saved AddedTokens are dicts with the text under ``content``."""
    return value["content"] if isinstance(value, dict) else value


def special_token_config(config: dict[str, Any], legacy_map: Path) -> dict[str, Any]:
    """The config with special tokens from special_tokens_map.json, which transformers reads only
    for directories saved before ``added_tokens_decoder`` was written to the config."""
    if "added_tokens_decoder" in config or not legacy_map.is_file():
        return config
    merged = dict(config)
    for key, value in read_json(legacy_map).items():
        if key == "additional_special_tokens":
            known = [token_text(token) for token in config.get(key) or []]
            value = known + [text for text in map(token_text, value) if text not in known]
        merged[key] = value
    return merged


def special_tokens_map(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' ``special_tokens_map``: the special tokens that are set, as strings."""
    tokens: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        value = [token_text(token) for token in value] if isinstance(value, list) else token_text(value)
        if value:
            tokens[key] = value
    return tokens


def chat_template_source(root: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja wins over the config's entry, and a named
    list of templates gives its ``default``."""
    file = root / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        if "default" not in named:
            raise PrivloraError(f"the tokenizer has several chat templates ({', '.join(sorted(named))}) "
                                "and none is named default")
        return named["default"]
    return template


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates may use to mark
    the assistant's tokens; it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def raise_exception(message: str) -> None:
    """Templates call this to refuse a conversation (roles that do not alternate, ...)."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain json.dumps, without jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str | None) -> jinja2.Template | None:
    """The template compiled in the sandboxed environment that transformers uses."""
    if source is None:
        return None
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise PrivloraError(f"the tokenizer's chat template is not valid jinja: {exc}") from exc


def class_post_processor(backend: Tokenizer, special_tokens: Mapping[str, Any],
                         config: Mapping[str, Any]) -> TemplateProcessing | None:
    """The post-processor that Llama-like tokenizer classes rebuild on load from add_bos_token and
    add_eos_token (it replaces the saved one); None for classes that keep the saved one."""
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    if name not in BOS_DEFAULT_BY_CLASS:
        return None
    add_bos = bool(config.get("add_bos_token", BOS_DEFAULT_BY_CLASS[name]))
    add_eos = bool(config.get("add_eos_token", False))
    bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise PrivloraError(f"{CONFIG_FILE} asks to add a bos or eos token that the tokenizer does not define")
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    added = [(bos, add_bos), (eos, add_eos)]
    special = [(token, backend.token_to_id(token)) for token, wanted in added if wanted]
    return TemplateProcessing(single=single, pair=pair, special_tokens=special)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text
