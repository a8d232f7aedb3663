"""The client's torch-free tokenizer gives transformers 4.47.1's prompts, token ids and text."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import transformers
from conftest import write_tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from privlora.tools.bench import CALIBRATION_PROMPTS
from privlora.errors import PrivloraError
from privlora.models.hf_tokenizer import encode_chat, load_tokenizer
from privlora.client.tokenizer import ClientTokenizer, load_client_tokenizer

SYSTEM = {"role": "system", "content": "You answer questions about the clinic, briefly."}
CONVERSATIONS = {
    "one-turn": [{"role": "user", "content": "When does the clinic open on weekdays?"}],
    "system": [SYSTEM, {"role": "user", "content": "Is parking free?"}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hello!"},
                   {"role": "assistant", "content": "Hello, how can I help?"},
                   {"role": "user", "content": "Do you treat   children  under two?"}],
    "unicode": [{"role": "user", "content": "Café naïve — 日本語のテキスト, émoji 🙂 and Ωmega"}],
    "whitespace": [{"role": "user", "content": "  leading, trailing  \n\n\ttabs and\r\nnewlines  "}],
    "empty": [{"role": "user", "content": ""}],
}
TEXTS = ["Hello world", " leading space", "trailing space ", "multiple   spaces\tand\ttabs\n\nand lines",
         "Unicode: naïve café, 日本語, Ωmega, 🙂", "isn't it ? yes , it 's done . they 're , we 've !",
         "<|im_start|>user\nspecial tokens inside text<|im_end|>", ""]
# A Llama-style chat format, written for these tests: bos/eos from the special tokens, a system
# block folded into the first user turn, alternation enforced with raise_exception, and the
# assistant's turns inside {% generation %}.
LLAMA_STYLE_TEMPLATE = (
    "{% set turns = messages %}{% set system = none %}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('user and assistant turns must alternate') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{% else %}{% generation %} {{ message['content'] | trim }} {{ eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)
# A multi-line template where trim_blocks/lstrip_blocks matter, with loop controls, tojson and
# strftime_now.
LISTING_TEMPLATE = """{{ bos_token }}year {{ strftime_now('%Y') }}
{% for message in messages %}
    {% if message['content'] == '' %}
        {% continue %}
    {% endif %}
    {{ message['role'] }}: {{ message['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}
assistant:
{% endif %}"""


def corpus() -> list[str]:
    """Training text: the calibration prompts and the test conversations."""
    contents = [message["content"] for turns in CONVERSATIONS.values() for message in turns]
    return CALIBRATION_PROMPTS.read_text().splitlines() + contents


def byte_level_bpe() -> Tokenizer:
    """A GPT-2-style byte-level BPE, which can encode any text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


def word_level() -> Tokenizer:
    """Whole words, an unknown-word token, no decoder (decoding joins tokens with spaces)."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus(), trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"], show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return backend


def save_llama_style(directory: Path) -> Path:
    """A byte-level BPE saved as a Llama tokenizer (its class rebuilds the post-processor)."""
    tokenizer = transformers.LlamaTokenizerFast(
        tokenizer_object=byte_level_bpe(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True,
        chat_template=LLAMA_STYLE_TEMPLATE, clean_up_tokenization_spaces=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def save_word_level(directory: Path) -> Path:
    """A word-level tokenizer saved by the generic class, whose bos comes from the post-processor;
    its add_bos_token is only a saved setting that transformers does not act on."""
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level(), bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]",
        add_bos_token=True, chat_template=LISTING_TEMPLATE)
    tokenizer.save_pretrained(str(directory))
    return directory


def reload(directory: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def id_sequences(reference: transformers.PreTrainedTokenizerBase) -> list[list[int]]:
    """Real sequences to decode: encoded prompts (special tokens included) and random ids."""
    chats = [reference.apply_chat_template(turns, add_generation_prompt=True) for turns in CONVERSATIONS.values()]
    texts = [reference(text).input_ids for text in TEXTS]
    draw = random.Random(0)
    noise = [[draw.randrange(len(reference)) for _ in range(40)] for _ in range(5)]
    return chats + texts + noise


def assert_same(client: ClientTokenizer, reference: transformers.PreTrainedTokenizerBase) -> None:
    """Every use the client makes of a tokenizer gives transformers' result."""
    assert (client.eos_token_id, client.bos_token_id, client.pad_token_id) == (
        reference.eos_token_id, reference.bos_token_id, reference.pad_token_id)
    for turns in CONVERSATIONS.values():
        for generation in (True, False):
            expected = reference.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation)
            assert client.chat_prompt(turns, add_generation_prompt=generation) == expected
            assert client.encode_chat(turns, add_generation_prompt=generation) == reference.apply_chat_template(
                turns, add_generation_prompt=generation)
    for text in TEXTS:
        for special in (True, False):
            assert client.encode(text, add_special_tokens=special) == reference(
                text, add_special_tokens=special).input_ids
    for ids in id_sequences(reference):
        for skip in (True, False):
            assert client.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


Saved = tuple[transformers.PreTrainedTokenizerBase, Path]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """The tokenizer the compiler uses and the client directory it saves."""
    tokenizer = load_tokenizer(smollm2_dir)
    saved = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(str(saved))
    return tokenizer, saved


@pytest.mark.smollm2
def test_smollm2_matches_transformers(smollm2: Saved) -> None:
    tokenizer, saved = smollm2
    client = load_client_tokenizer(saved)
    assert_same(client, tokenizer)
    assert client.encode("Hi", add_special_tokens=True)[0] == tokenizer.bos_token_id  # add_bos_token is on
    assert client.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.smollm2
def test_smollm2_one_question_as_the_compiler_encodes_it(smollm2: Saved) -> None:
    tokenizer, saved = smollm2
    question = "If I want to visit on a normal weekday, when does Larkspur Valley Clinic open and close?"
    assert load_client_tokenizer(saved).encode_chat(question) == encode_chat(tokenizer, question)


@pytest.mark.parametrize("save", [save_llama_style, save_word_level], ids=["llama-bpe", "generic-wordlevel"])
def test_other_families_match_transformers(save, tmp_path: Path) -> None:
    directory = save(tmp_path / "tokenizer")
    client, reference = load_client_tokenizer(directory), reload(directory)
    assert_same(client, reference)
    assert client.encode("Hello", add_special_tokens=True)[0] == reference.bos_token_id


PAD_AS_SAVED = {"content": "[PAD]", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
HAND_WRITTEN = {
    # Special tokens the backend does not list: a new token, and a vocabulary word made special.
    "unlisted-specials": ({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": {},
                           "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "clinic",
                           "chat_template": LISTING_TEMPLATE}, None),
    # An older layout: no added_tokens_decoder, so special_tokens_map.json overrides the config.
    "legacy-map": ({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                    "additional_special_tokens": ["<s>"], "chat_template": LISTING_TEMPLATE},
                   {"eos_token": PAD_AS_SAVED, "additional_special_tokens": ["[UNK]", "<s>"]}),
}


@pytest.mark.parametrize("layout", HAND_WRITTEN, ids=list(HAND_WRITTEN))
def test_directories_not_written_by_save_pretrained(layout: str, tmp_path: Path) -> None:
    config, special_map = HAND_WRITTEN[layout]
    word_level().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    client, reference = load_client_tokenizer(tmp_path), reload(tmp_path)
    assert_same(client, reference)
    assert client.special_tokens == reference.special_tokens_map


def test_llama_class_rebuilds_the_post_processor_from_the_config(tmp_path: Path) -> None:
    """A Llama tokenizer whose eos changed after it was built saves a stale post-processor; the
    class rebuilds it from add_bos_token/add_eos_token on load, and so must the client."""
    tokenizer = transformers.LlamaTokenizerFast(
        tokenizer_object=byte_level_bpe(), bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True,
        add_bos_token=False, add_eos_token=True)
    tokenizer.eos_token = "<unk>"
    tokenizer.save_pretrained(str(tmp_path))
    client, reference = load_client_tokenizer(tmp_path), reload(tmp_path)
    for text in TEXTS:
        assert client.encode(text, add_special_tokens=True) == reference(text).input_ids
    assert client.encode("Hello", add_special_tokens=True)[-1] == reference.convert_tokens_to_ids("<unk>")
    assert client.encode("Hello", add_special_tokens=True) != tokenizer("Hello").input_ids  # stale in memory


def test_chat_template_file_and_named_templates(tmp_path: Path) -> None:
    """chat_template.jinja overrides the config's template; of named templates the default is used."""
    raw_file = save_llama_style(tmp_path / "file")
    config = json.loads((raw_file / "tokenizer_config.json").read_text())
    config["chat_template"] = "ignored"
    (raw_file / "tokenizer_config.json").write_text(json.dumps(config))
    (raw_file / "chat_template.jinja").write_text(LISTING_TEMPLATE)
    named = tmp_path / "named"
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level(), bos_token="<s>", eos_token="</s>",
        chat_template={"default": LISTING_TEMPLATE, "tool_use": "tools"}).save_pretrained(str(named))
    for directory in (raw_file, named):
        turns = CONVERSATIONS["multi-turn"]
        assert load_client_tokenizer(directory).chat_prompt(turns) == reload(directory).apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True)


def test_template_refusal_is_one_clear_error(tmp_path: Path) -> None:
    directory = save_llama_style(tmp_path)
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        reload(directory).apply_chat_template(turns)
    with pytest.raises(PrivloraError, match="rejected the conversation: user and assistant turns must alternate"):
        load_client_tokenizer(directory).encode_chat(turns)


def test_tokenizer_without_chat_template_suggests_raw(tmp_path: Path) -> None:
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level(), eos_token="</s>").save_pretrained(str(tmp_path))
    client = load_client_tokenizer(tmp_path)
    assert client.encode("Hello world") == reload(tmp_path)("Hello world", add_special_tokens=False).input_ids
    with pytest.raises(PrivloraError, match="no chat template; pass --raw"):
        client.encode_chat("Hello")


@pytest.mark.parametrize("damage, message", [
    ("missing", "is not a saved tokenizer"),
    ("no-backend", "is not a saved tokenizer"),
    ("backend", "cannot load the tokenizer file"),
    ("config", "cannot read the tokenizer file"),
    ("template", "chat template is not valid jinja"),
])
def test_broken_directories_are_one_clear_error(damage: str, message: str, tmp_path: Path) -> None:
    directory = save_llama_style(tmp_path / "tokenizer")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    if damage == "missing":
        directory = tmp_path / "absent"
    elif damage == "no-backend":
        (directory / "tokenizer.json").unlink()
    elif damage == "backend":
        (directory / "tokenizer.json").write_text('{"model": ')
    elif damage == "config":
        (directory / "tokenizer_config.json").write_bytes(b"\xff not json")
    else:
        config["chat_template"] = "{% for message in messages %}"
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PrivloraError, match=message) as caught:
        load_client_tokenizer(directory)
    assert "\n" not in str(caught.value)


def test_tiny_tokenizer_agrees_with_the_compiler_tokenizer(tiny_llama: Path) -> None:
    directory = write_tiny_tokenizer(tiny_llama, vocab_size=160)
    reference, client = load_tokenizer(directory), load_client_tokenizer(directory)
    assert len(reference) <= 160 and max(reference.get_vocab().values()) < 160
    assert reference.eos_token == "<|im_end|>" and reference.pad_token == "<|endoftext|>"
    assert_same(client, reference)


def test_import_and_use_without_torch_or_transformers(tmp_path: Path) -> None:
    directory = save_llama_style(tmp_path / "tokenizer")
    script = (
        "import sys\n"
        "from privlora.client.tokenizer import load_client_tokenizer\n"
        f"tokenizer = load_client_tokenizer({str(directory)!r})\n"
        "ids = tokenizer.encode_chat('Is parking free?')\n"
        "assert ids and tokenizer.decode(ids, skip_special_tokens=True)\n"
        "heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers'))\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
