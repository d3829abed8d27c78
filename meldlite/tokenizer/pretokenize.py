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
    \\x84 mark, \\x86 symbol, \\x80 anything else.

A regex without any \\p{..} class (DeepSeek's literal CJK and Latin ranges) is
run by llama.cpp with `std::wregex` over the code points themselves, with only
non-ASCII white space replaced by \\x0b; meldlite runs it over that same view.

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
_SYMBOL = "\x86"
_HAN = "\x87"  # only in the Kimi-K2 view (its splitter treats Han apart from other letters)
# llama.cpp's `unicode_cpt_is_han`
HAN_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0x2CEB0, 0x2EBEF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
_CLASS_RANGES = (
    (unicode_data.LETTER, _LETTER),
    (unicode_data.NUMBER, _NUMBER),
    (unicode_data.PUNCTUATION, _PUNCT),
    (unicode_data.MARK, _MARK),
    (unicode_data.SYMBOL, _SYMBOL),
)
_WHITESPACE = frozenset(unicode_data.WHITESPACE)


def _boundaries():
    """Sorted range starts, ends and placeholders of all classes, for bisect."""
    ranges = sorted((a, b, ph) for table, ph in _CLASS_RANGES for a, b in table)
    return [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]


_STARTS, _ENDS, _PLACEHOLDERS = _boundaries()
_COLLAPSE = {}  # code point -> placeholder, filled lazily for code points >= 128
_COLLAPSE_HAN = {}  # the same with Han code points as _HAN
_WIDE = {c: _WS for c in _WHITESPACE if c >= 128}  # the std::wregex view: only white space


def _placeholder(cpt):
    if cpt in _WHITESPACE:
        return _WS
    i = bisect.bisect_right(_STARTS, cpt) - 1
    if i >= 0 and cpt <= _ENDS[i]:
        return _PLACEHOLDERS[i]
    return _OTHER


def collapse(text, han=False):
    """`text` with every non-ASCII code point replaced by its class placeholder
    (`han`: Han code points by _HAN)."""
    table = _COLLAPSE_HAN if han else _COLLAPSE
    for ch in set(text):
        cpt = ord(ch)
        if cpt >= 128 and cpt not in table:
            is_han = han and any(a <= cpt <= b for a, b in HAN_RANGES)
            table[cpt] = _HAN if is_han else _placeholder(cpt)
    return text.translate(table)


def widen(text):
    """`text` with non-ASCII white space replaced by \\x0b (llama.cpp's wregex input)."""
    return text.translate(_WIDE)


def _ascii_class(ranges, placeholder):
    """Regex character-class body: the ASCII members of `ranges` plus `placeholder`."""
    chars = [c for a, b in ranges if a < 128 for c in range(a, min(b, 127) + 1)]
    return "".join(f"\\x{c:02x}" for c in chars) + f"\\x{ord(placeholder):02x}"


_LETTERS_NOT_HAN = _ascii_class(unicode_data.LETTER, _LETTER)
_LETTERS = _LETTERS_NOT_HAN + f"\\x{ord(_HAN):02x}"
_CLASS_BODIES = {
    r"\p{L}": _LETTERS,
    r"\p{N}": _ascii_class(unicode_data.NUMBER, _NUMBER),
    r"\p{P}": _ascii_class(unicode_data.PUNCTUATION, _PUNCT),
    r"\p{M}": _ascii_class(unicode_data.MARK, _MARK),
    r"\p{S}": _ascii_class(unicode_data.SYMBOL, _SYMBOL),
    # llama.cpp maps the letter subclasses to the whole letter class
    **dict.fromkeys((r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}"), _LETTERS),
    r"\p{Han}": f"\\x{ord(_HAN):02x}",
    r"\p{L_not_Han}": _LETTERS_NOT_HAN,  # meldlite's name for [\p{L}&&[^\p{Han}]]
    r"\s": _ascii_class([(c, c) for c in unicode_data.WHITESPACE], _WS),
}


def text_view(pattern):
    """The text llama.cpp runs `pattern` over: "han" (the Kimi-K2 splitter),
    "collapsed" (a regex with a \\p{..} class) or "wide" (std::wregex)."""
    if r"\p{Han}" in pattern:
        return "han"
    if any(marker in pattern for marker in _CLASS_BODIES if marker != r"\s"):
        return "collapsed"
    return "wide"


_VIEWS = {"han": lambda t: collapse(t, han=True), "collapsed": collapse, "wide": widen}


def compile_collapsed(pattern):
    """Compile a regex written with \\p{L} \\p{N} \\p{P} \\p{M} \\p{S} \\s inside [...] only."""
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
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
_UPPER_LOWER = (  # [^a-z] then [^A-Z] letters: llama.cpp's stand-in for \p{Lu}*\p{Ll}+
    r"[^\r\n\p{L}\p{N}]?(?:(?=[@L])[^a-z])*(?:(?=[@L])[^A-Z])+"
    + _CONTRACTION
    + r"|[^\r\n\p{L}\p{N}]?(?:(?=[@L])[^a-z])+(?:(?=[@L])[^A-Z])*"
    + _CONTRACTION
)
GPT4O = (
    _UPPER_LOWER.replace("@L", r"\p{L}") + r"|[\p{N}]{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _SPACES
)
GRANITE_EMB = (
    _UPPER_LOWER.replace("@L", r"\p{L}\p{M}")
    + r"|[\p{N}]{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    + _SPACES
)
TEKKEN = (
    _UPPER_LOWER.replace("@L", r"\p{L}").replace(_CONTRACTION, "")
    + r"|[\p{N}]| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    + _SPACES
)
_CJK = r"[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK_LLM = (
    r"[\r\n]",
    r"[\s]?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    r"\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    r"\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    r"\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    r"\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    r"\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    r"\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    r"\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    r"\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    r"\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    r"\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    r"\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    r"\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    r"[\s]?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"[\s]+\Z",  # std::regex "$": the end of the piece only
    _CJK,
    r"[\p{N}]+",
)
DEEPSEEK_CODER = (r"[\r\n]", r"[\s]?[\p{L}]+", r"[\s]?[\p{P}]+", _CJK, r"[\p{N}]")
_ASCII_PUNCT_WORD = r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
DEEPSEEK3 = (
    r"[\p{N}]{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|" + _SPACES,
)
KIMI_K2 = (  # llama.cpp's hand-written splitter: letters are \p{L} only (no \p{M})
    r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{L_not_Han}]+"
    + _CONTRACTION
    + r"|[\p{N}]{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    + _SPACES
)
BLOOM = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_QWEN2_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _SPACES
SEED_CODER = _ANYCASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]{1}| ?[^\s\p{L}\p{N}\r\n]+|" + _SPACES
BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]"
    + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|[\s]*[\r\n]|[\s]+(?![^\s])|[\s]+"
)
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]" + _QWEN2_TAIL
MINICPM5 = (r"[\p{N}]{1,3}", _ANYCASE + r"|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]+" + _QWEN2_TAIL)
SPARK25 = (
    r"[\p{N}]{1,3}",
    r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    _ASCII_PUNCT_WORD
    + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|[\s]+(?![^\s])|[\s]+",
    r"[\p{N}]",
)
_YOUTU_UPPER, _YOUTU_LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
YOUTU = (
    r"[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b"
    r"\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_YOUTU_UPPER}*{_YOUTU_LOWER}+{_CONTRACTION}"
    + rf"|[^\r\n\p{{L}}\p{{N}}]?{_YOUTU_UPPER}+{_YOUTU_LOWER}*{_CONTRACTION}"
    + r"|[\p{N}]| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    + _SPACES,
)
EXAONE_MOE = (
    _ANYCASE
    + r"|[^\r\n\p{L}\p{N}]?(?:[\p{L}][\p{M}]*(?: [\p{L}][\p{M}]*)*)+|[\p{N}]"
    + r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|[\s]*[\r\n]|[\s]+(?![^\s])|[\s]+"
)
JAIS2 = (
    _ANYCASE
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}]+|[\p{N}]{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|[\s]*[\r\n]+|"
    + "|".join(rf"[\s]{{{n}}}(?![^\s])" for n in (512, 256, 128, 64, 32, 16, 8, 4))
    + r"|[\s]{1,2}(?![^\s])|[\s]{1}"
)
LINES = r"[^\n]+|[\n]+"
CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"[\p{N}]",
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2,
)
DIGITS = r"[\p{N}]+"
DIGIT = r"[\p{N}]"
ASCII_DIGITS_3 = r"[0-9][0-9][0-9]"


class PreTokenizer:
    """A sequence of regexes; `split(text)` returns the words, in order."""

    def __init__(self, patterns):
        self.patterns = tuple(patterns)
        self._compiled = [(text_view(p), compile_collapsed(p)) for p in self.patterns]

    def split(self, text):
        views = {}
        spans = [(0, len(text))] if text else []
        for view, regex in self._compiled:
            if view not in views:
                views[view] = _VIEWS[view](text)
            spans = _split_spans(regex, views[view], spans)
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
    table.update(
        {
            "minicpm5": PreType("MINICPM5", MINICPM5, ignore_merges=True),
            "exaone-moe": PreType("EXAONE_MOE", (EXAONE_MOE,)),
            "jais-2": PreType("JAIS2", (JAIS2,)),
        }
    )
    table.update(_pre_types_no_clean())
    return table


def _pre_types_no_clean():
    """Pre-tokenizers whose detokenizer keeps " ," " ." as they are (clean_spaces off)."""
    deepseek3 = PreType("DEEPSEEK3_LLM", DEEPSEEK3, clean_spaces=False)
    gpt4o = PreType("GPT4O", (GPT4O,), clean_spaces=False)
    table = {
        "deepseek-llm": PreType("DEEPSEEK_LLM", DEEPSEEK_LLM, clean_spaces=False),
        "deepseek-coder": PreType("DEEPSEEK_CODER", DEEPSEEK_CODER, clean_spaces=False),
        "tekken": PreType(
            "TEKKEN", (TEKKEN,), ignore_merges=True, add_bos=True, clean_spaces=False
        ),
        "granite-embed-multi-97m": PreType(
            "GRANITE_EMB_MULTI", (GRANITE_EMB,), ignore_merges=True, clean_spaces=False
        ),
        "poro-chat": PreType("PORO", (BLOOM,), clean_spaces=False),
        "viking": PreType("VIKING", (BLOOM, DIGIT), clean_spaces=False),
        "bloom": PreType("BLOOM", (BLOOM,)),
        "gpt3-finnish": PreType("GPT3_FINNISH", (BLOOM,)),
    }
    table.update(
        {
            "seed-coder": PreType("SEED_CODER", (SEED_CODER,), clean_spaces=False),
            "ufakzeka": PreType("UFAKZEKA", (UFAKZEKA,), clean_spaces=False),
            "spark2_5": PreType("SPARK2_5", SPARK25, clean_spaces=False),
            "youtu": PreType("YOUTU", YOUTU, ignore_merges=True, clean_spaces=False),
            "laguna": PreType("LAGUNA", (LINES, QWEN2), clean_spaces=False),
            "chameleon": PreType("CHAMELEON", CHAMELEON, add_bos=True, clean_spaces=False),
            "kimi-k2": PreType("KIMI_K2", (KIMI_K2,), clean_spaces=False),
        }
    )
    bailing = PreType("BAILINGMOE", (BAILINGMOE,), clean_spaces=False)
    table.update(dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), bailing))
    table.update(dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), deepseek3))
    table.update(dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), gpt4o))
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
