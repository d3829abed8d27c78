"""Chat templates (meldlite.tokenizer.chat): real templates of the families meldlite
runs, from llama.cpp's source distribution, render as llama-cpp-python's Jinja2
renderer renders them, and the prompt's ids equal llama.cpp's tokenization."""

import pytest
from helpers_llamacpp_src import llamacpp_file

from meldlite.errors import OptionError, TemplateError
from meldlite.formats import read_gguf
from meldlite.tokenizer import Tokenizer
from meldlite.tokenizer.chat import FALLBACK, ChatTemplate, prompt_ids

# template file -> (family it serves, real vocabulary to tokenize it with, or None)
TEMPLATES = {
    "Qwen-Qwen3-0.6B.jinja": ("qwen3moe/qwen3", "qwen2"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("qwen2", "qwen2"),
    "deepseek-ai-DeepSeek-V3.1.jinja": ("deepseek2", None),
    "moonshotai-Kimi-K2.jinja": ("deepseek2 (Kimi-K2)", None),
    "openai-gpt-oss-120b.jinja": ("gpt-oss", None),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": ("granitemoe", "refact"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("llama (Mixtral-style)", "llama-bpe"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("llama", None),
    "google-gemma-2-2b-it.jinja": ("gemma", None),
}
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about Lily and her dog. Ünïcödé, 日本語 ok?"},
    {"role": "assistant", "content": "Once upon a time, Lily had a dog named Max."},
    {"role": "user", "content": "And then?"},
]


def template_text(name):
    path = llamacpp_file(name)
    if path is None:
        pytest.skip("llama.cpp's templates unavailable (no PyPI; set MELDLITE_LLAMA_CPP_SRC)")
    return path.read_text()


def messages_for(name):
    if "gemma" in name or "Mistral-Nemo" in name:  # no system role in these templates
        return MESSAGES[1:]
    return MESSAGES


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_templates_render_as_llama_cpp_python(name, generation_prompt):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = template_text(name)
    msgs = messages_for(name)
    ours = ChatTemplate(source, "<s>", "</s>").render(msgs, generation_prompt)
    ref = Jinja2ChatFormatter(source, "</s>", "<s>", add_generation_prompt=generation_prompt)
    assert ours == ref(messages=msgs).prompt
    assert "Lily" in ours and "日本語" in ours


@pytest.mark.parametrize("name", sorted(n for n, (_, v) in TEMPLATES.items() if v))
def test_prompt_ids_equal_llama_cpp_with_one_bos(name):
    import llama_cpp

    vocab = llamacpp_file(f"ggml-vocab-{TEMPLATES[name][1]}.gguf")
    if vocab is None:
        pytest.skip("llama.cpp's vocabularies unavailable")
    tok = Tokenizer.from_metadata(read_gguf(vocab).metadata)
    tmpl = ChatTemplate.for_model({"tokenizer.chat_template": template_text(name)}, tok)
    text = tmpl.render(messages_for(name))
    ids = prompt_ids(tok, text)
    llm = llama_cpp.Llama(str(vocab), vocab_only=True, verbose=False)
    try:
        bos_text = tmpl.bos_token
        add_bos = not (bos_text and text.startswith(bos_text))
        ref = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
    finally:
        llm.close()
    assert ids == ref
    if tok.bos_id is not None and tok.add_bos:
        assert ids.count(tok.bos_id) == 1


def test_fallback_is_chatml_and_errors_are_named():
    text = ChatTemplate(FALLBACK).render(MESSAGES[:2])
    assert text.startswith("<|im_start|>system\nYou tell") and text.endswith(
        "<|im_start|>assistant\n"
    )
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="only user"):
        ChatTemplate("{{ raise_exception('only user') }}").render(MESSAGES)
    with pytest.raises(OptionError):
        ChatTemplate(FALLBACK).render([])


def test_templates_run_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        ChatTemplate(evil).render(MESSAGES)
    with pytest.raises(TemplateError):  # immutable: a template cannot change the messages
        ChatTemplate("{{ messages.append(1) }}").render(MESSAGES)


# templates whose format llama.cpp also implements in C++ (llama_chat_apply_template)
# as the template renders it. Its built-in deepseek3, llama3 and gpt-oss formats are
# simplified (no date header, no <think></think>, no default system message), so
# those are checked against the Jinja2 renderer only.
BUILTIN_FORMATS = [
    "Qwen-Qwen2.5-7B-Instruct.jinja",
    "Qwen-Qwen3-0.6B.jinja",
    "ibm-granite-granite-3.3-2B-Instruct.jinja",
    "moonshotai-Kimi-K2.jinja",
    "google-gemma-2-2b-it.jinja",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja",
]


def llama_chat_apply_template(source, messages, add_assistant):
    """llama.cpp's own C++ rendering of the format it detects in `source`."""
    import ctypes

    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []  # the encoded strings must outlive the call
    for i, m in enumerate(messages):
        keep += [m["role"].encode(), m["content"].encode()]
        chat[i].role, chat[i].content = keep[-2], keep[-1]
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(
        source.encode(), chat, len(messages), add_assistant, buf, len(buf)
    )
    assert 0 <= n <= len(buf), "llama.cpp does not know this template's format"
    return buf.raw[:n].decode()


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", BUILTIN_FORMATS)
def test_templates_render_as_llama_cpps_builtin_formats(name, generation_prompt):
    source = template_text(name)
    msgs = messages_for(name)
    ours = ChatTemplate(source, "<s>", "</s>").render(msgs, generation_prompt)
    ref = llama_chat_apply_template(source, msgs, generation_prompt)
    # llama.cpp's formats leave BOS to the tokenizer; a template writes it (prompt_ids
    # then adds no second one)
    assert ours.removeprefix("<s>") == ref
