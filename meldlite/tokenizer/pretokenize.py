"""BPE pre-tokenizers: split text into words the way llama.cpp's `unicode_regex_split` does.

llama.cpp classifies every code point with tables of one Unicode version (see
`unicode_data.py`) and then either runs a hand-written splitter (for the GPT-2,
Llama 3, Qwen 2 and Qwen 3.5 regexes) or `std::regex` over a "collapsed" copy of
the text in which every non-ASCII code point is replaced by one byte standing
for its class.  meldlite does the same collapse and runs Python's `re` over it
with small ASCII classes, so both paths reduce to plain regexes whose classes
match llama.cpp's tables exactly:

    collapsed alphabet: ASCII stays itself; other code points become
    \\x0b (white space), \\x81 letter, \\x82 number, \\x83 punctuation,
    \\x84 mark, \\x80 anything else.

Splitting follows `unicode_regex_split_stl`: each regex of a pre-tokenizer is
applied inside every piece the previous one produced, and the text between
matches is kept as pieces of its own.
"""

import bisect
import re
from dataclasses import dataclass

from meldlite.tokenizer import unicode_data

# -- code point classes ------------------------------------------------------

_WS, _OTHER, _LETTER, _NUMBER, _PUNCT, _MARK = "\x0b", "\x80", "\x81", "\x82", "\x83", "\x84"
_CLASS_RANGES = (
    (unicode_data.LETTER, _LETTER),
    (unicode_data.NUMBER, _NUMBER),
    (unicode_data.PUNCTUATION, _PUNCT),
    (unicode_data.MARK, _MARK),
)
_WHITESPACE = frozenset(unicode_data.WHITESPACE)


def _boundaries():
    """Sorted range starts, ends and placeholders of all classes, for bisect."""
    ranges = sorted((a, b, ph) for table, ph in _CLASS_RANGES for a, b in table)
    return [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]


_STARTS, _ENDS, _PLACEHOLDERS = _boundaries()
_COLLAPSE = {}  # code point -> placeholder, filled lazily for code points >= 128


def _placeholder(cpt):
    if cpt in _WHITESPACE:
        return _WS
    i = bisect.bisect_right(_STARTS, cpt) - 1
    if i >= 0 and cpt <= _ENDS[i]:
        return _PLACEHOLDERS[i]
    return _OTHER


def collapse(text):
    """`text` with every non-ASCII code point replaced by its class placeholder."""
    for ch in set(text):
        cpt = ord(ch)
        if cpt >= 128 and cpt not in _COLLAPSE:
            _COLLAPSE[cpt] = _placeholder(cpt)
    return text.translate(_COLLAPSE)


def _ascii_class(ranges, placeholder):
    """Regex character-class body: the ASCII members of `ranges` plus `placeholder`."""
    chars = [c for a, b in ranges if a < 128 for c in range(a, min(b, 127) + 1)]
    return "".join(f"\\x{c:02x}" for c in chars) + f"\\x{ord(placeholder):02x}"


_CLASS_BODIES = {
    r"\p{L}": _ascii_class(unicode_data.LETTER, _LETTER),
    r"\p{N}": _ascii_class(unicode_data.NUMBER, _NUMBER),
    r"\p{P}": _ascii_class(unicode_data.PUNCTUATION, _PUNCT),
    r"\p{M}": _ascii_class(unicode_data.MARK, _MARK),
    r"\s": _ascii_class([(c, c) for c in unicode_data.WHITESPACE], _WS),
}


def compile_collapsed(pattern):
    """Compile a regex written with \\p{L} \\p{N} \\p{P} \\p{M} \\s inside [...] only."""
    for marker, body in _CLASS_BODIES.items():
        pattern = pattern.replace(marker, body)
    return re.compile(pattern)


# -- the regexes (llama.cpp's `llm_tokenizer_bpe` constructor), classes in brackets --

_SPACES = r"[\s]*[\r\n]+|[\s]+(?![^\s])|[\s]+"
_ANYCASE = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}]+| ?[\p{N}]+| ?[^\s\p{L}\p{N}]+|[\s]+(?![^\s])"
LLAMA3 = _ANYCASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _SPACES
QWEN2 = _ANYCASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _SPACES
QWEN35 = (
    _ANYCASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|[\p{N}]| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|" + _SPACES
)
DEFAULT_PUNCT = r"[\p{P}$+<=>^~|]+"
FALCON_PUNCT = r"[\p{P}$+<=>^~|`]+"
DIGITS = r"[\p{N}]+"
DIGIT = r"[\p{N}]"
ASCII_DIGITS_3 = r"[0-9][0-9][0-9]"


class PreTokenizer:
    """A sequence of regexes; `split(text)` returns the words, in order."""

    def __init__(self, patterns):
        self.patterns = tuple(patterns)
        self._compiled = [compile_collapsed(p) for p in self.patterns]

    def split(self, text):
        collapsed = collapse(text)
        spans = [(0, len(text))] if text else []
        for regex in self._compiled:
            spans = _split_spans(regex, collapsed, spans)
        return [text[a:b] for a, b in spans]


def _split_spans(regex, text, spans):
    """Each span cut into regex matches and the unmatched text between them."""
    out = []
    for start, end in spans:
        pos = start
        for m in regex.finditer(text, start, end):
            if m.start() > pos:
                out.append((pos, m.start()))
            out.append(m.span())
            pos = m.end()
        if pos < end:
            out.append((pos, end))
    return out


# -- tokenizer.ggml.pre values ------------------------------------------------


@dataclass(frozen=True)
class PreType:
    """What one `tokenizer.ggml.pre` value sets in llama.cpp's vocab loader."""

    family: str  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_* name
    patterns: tuple
    ignore_merges: bool = False  # a word that is a token is taken whole
    add_bos: bool = False  # default of tokenizer.ggml.add_bos_token
    clean_spaces: bool = True  # detokenize removes " ," " ." " 's" ...
    has_bos: bool = True  # False: no default BOS id


_DEFAULT = (DEFAULT_PUNCT, GPT2, DIGITS, ASCII_DIGITS_3)
_STARCODER = (DIGIT, GPT2)


def _pre_types():
    gpt2 = PreType("GPT2", (GPT2,))
    llama3 = PreType("LLAMA3", (LLAMA3,), ignore_merges=True, add_bos=True)
    qwen2 = PreType("QWEN2", (QWEN2,), clean_spaces=False)
    starcoder = PreType("STARCODER", _STARCODER)
    table = {"default": PreType("DEFAULT", _DEFAULT)}
    table.update(
        dict.fromkeys(
            (
                "gpt-2",
                "phi-2",
                "jina-es",
                "jina-de",
                "gigachat",
                "jina-v2-es",
                "jina-v2-de",
                "a.x-4.0",
                "mellum",
                "modern-bert",
                "exaone4",
            ),
            gpt2,
        )
    )
    table.update(
        {
            "mpt": PreType("MPT", (GPT2,)),
            "olmo": PreType("OLMO", (GPT2,)),
            "jais": PreType("JAIS", (GPT2,)),
            "trillion": PreType("TRILLION", (GPT2,), clean_spaces=False),
            "granite-docling": PreType("GRANITE_DOCLING", (GPT2,), clean_spaces=False),
        }
    )
    table.update(
        dict.fromkeys(
            (
                "llama3",
                "llama-v3",
                "llama-bpe",
                "falcon3",
                "falcon-h1",
                "pixtral",
                "midm-2.0",
                "lfm2",
                "jina-v5-nano",
            ),
            llama3,
        )
    )
    table.update(
        {
            "dbrx": PreType("DBRX", (LLAMA3,)),
            "smaug-bpe": PreType("SMAUG", (LLAMA3,)),
            "chatglm-bpe": PreType("CHATGLM4", (LLAMA3,), has_bos=False),
            "glm4": PreType("CHATGLM4", (LLAMA3,), ignore_merges=True, has_bos=False),
            "glm5": PreType("CHATGLM4", (LLAMA3,), ignore_merges=True, has_bos=False),
        }
    )
    table.update(
        dict.fromkeys(
            ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"), qwen2
        )
    )
    table.update(
        {
            "megrez": PreType("QWEN2", (QWEN2,)),
            "stablelm2": PreType("STABLELM2", (QWEN2,)),
            "grok-2": PreType("GROK_2", (QWEN2,), clean_spaces=False),
            "qwen35": PreType("QWEN35", (QWEN35,), clean_spaces=False),
            "falcon": PreType("FALCON", (FALCON_PUNCT, GPT2, ASCII_DIGITS_3)),
        }
    )
    table.update(
        dict.fromkeys(
            ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"), starcoder
        )
    )
    table.update(
        dict.fromkeys(("command-r", "smollm"), PreType("STARCODER", _STARCODER, clean_spaces=False))
    )
    return table


PRE_TYPES = _pre_types()
_PRETOKENIZERS = {}


def pretokenizer(pre_type):
    """The (shared, compiled once) PreTokenizer of a PreType."""
    if pre_type.patterns not in _PRETOKENIZERS:
        _PRETOKENIZERS[pre_type.patterns] = PreTokenizer(pre_type.patterns)
    return _PRETOKENIZERS[pre_type.patterns]


# -- GPT-2 byte <-> unicode map (byte-level BPE) -----------------------------


def _byte_to_unicode():
    """Printable bytes map to themselves; the others to U+0100 onwards, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}
_LATIN1_TO_GPT2 = dict(enumerate(BYTE_TO_UNICODE))


def byte_encode(word):
    """A word's UTF-8 bytes, each written as its GPT-2 stand-in character."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_GPT2)
