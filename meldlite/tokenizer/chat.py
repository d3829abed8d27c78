"""Chat templates: the GGUF's `tokenizer.chat_template` (Jinja) rendered into the
prompt text, and that text into token ids as llama.cpp does.

A template is untrusted content of a downloaded file, so it runs in jinja2's
`ImmutableSandboxedEnvironment` with the settings and helpers Hugging Face's
renderer gives templates (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the
`{% generation %}` tag ignored). A file without a template gets `FALLBACK`, the
ChatML format (`<|im_start|>role ... <|im_end|>`).
"""

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from meldlite.errors import OptionError, TemplateError

TEMPLATE_KEY = "tokenizer.chat_template"

FALLBACK = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _IgnoreGeneration(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (training markup) renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _one_line(err):
    return " ".join(str(err).split())


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the vocabulary's BOS/EOS texts."""

    def __init__(self, source, bos_token="", eos_token=""):
        if not isinstance(source, str) or not source.strip():
            raise OptionError("a chat template must be non-empty text")
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_IgnoreGeneration, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not parse: {_one_line(e)}") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def for_model(cls, metadata, tokenizer, override=None):
        """The template of a model: `override` (text) if given, else the file's
        `tokenizer.chat_template`, else FALLBACK; BOS/EOS texts from `tokenizer`."""
        source = override or metadata.get(TEMPLATE_KEY) or FALLBACK

        def text(tid):
            if tid is None:
                return ""
            return tokenizer.token_to_piece(tid, special=True).decode("utf-8", "replace")

        return cls(source, text(tokenizer.bos_id), text(tokenizer.eos_id))

    def render(self, messages, add_generation_prompt=True, tools=None, **extra):
        """The prompt text of `messages` (a list of {"role", "content", ...} dicts)."""
        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                raise_exception=_raise_exception,
                strftime_now=_strftime_now,
                **extra,
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise TemplateError(
                f"chat template failed: {type(e).__name__}: {_one_line(e)}"
            ) from None


def _check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise OptionError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OptionError(f"a message needs a 'role' string: {m!r}")


def prompt_ids(tokenizer, text):
    """Token ids of a rendered chat prompt: special-token texts parsed as special
    tokens, and the vocabulary's BOS added unless the template already wrote it
    (llama.cpp would otherwise give two BOS)."""
    bos = tokenizer.bos_id
    ids = tokenizer.encode(text, add_bos=True, parse_special=True)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids
