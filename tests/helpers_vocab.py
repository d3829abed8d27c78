"""Test helpers for the tokenizer: a tiny byte-level BPE trainer, GGUF vocab-only
files written with gguf-py, a varied text corpus, and llama.cpp (through
llama-cpp-python) as the oracle.

Nothing here imports meldlite's tokenizer: the byte map and word splitting of
the trainer are written independently so that the oracle comparison stays
independent.
"""

import ctypes
import heapq
import itertools
import re
from collections import Counter, defaultdict
from pathlib import Path

import gguf
import pytest
from gguf import TokenType

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSTORIES = SHARED / "models" / "tinystories-moe-f16.gguf"
VALID_TXT = SHARED / "models" / "valid.txt"
REPO = Path(__file__).resolve().parents[1]

# -- GPT-2 byte map (written from the published scheme, not from meldlite) ----


def gpt2_byte_chars():
    """256 characters standing for the bytes 0..255 in byte-level BPE vocabularies."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


BYTE_CHARS = gpt2_byte_chars()
_WORD = re.compile(r"'[a-z]+| ?[^\W\d_]+| ?\d| ?[^\s\w]+|\s+")


def _train_words(text):
    """Byte-encoded training words and their counts (a rough GPT-2-like split)."""
    counts = Counter(_WORD.findall(text))
    return {
        tuple(BYTE_CHARS[b] for b in w.encode("utf-8", "surrogatepass")): c
        for w, c in counts.items()
    }


# -- BPE trainer -----------------------------------------------------------------


class _PairCounts:
    """Pair counts over the training words, with a lazy max-heap."""

    def __init__(self, words):
        self.words = [list(w) for w in words]
        self.freq = list(words.values())
        self.count = Counter()
        self.where = defaultdict(set)
        self.heap = []  # (-count, pair), stale entries skipped in best()
        for i, w in enumerate(self.words):
            self._add(i, w, +1)

    def _add(self, i, w, sign):
        for pair in itertools.pairwise(w):
            self.count[pair] += sign * self.freq[i]
            if sign > 0:
                self.where[pair].add(i)
            if self.count[pair] > 0:
                heapq.heappush(self.heap, (-self.count[pair], pair))

    def best(self):
        while self.heap:
            neg, pair = heapq.heappop(self.heap)
            if self.count.get(pair, 0) == -neg and -neg > 0:
                return pair
        return None

    def merge(self, pair):
        merged = pair[0] + pair[1]
        for i in list(self.where.pop(pair, ())):
            w = self.words[i]
            self._add(i, w, -1)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            self.words[i] = out
            self._add(i, out, +1)


def train_bpe(text, n_merges):
    """Byte-level BPE merges (list of (left, right)) learned from `text`."""
    counts = _PairCounts(_train_words(text))
    merges = []
    while len(merges) < n_merges:
        pair = counts.best()
        if pair is None:
            break
        merges.append(pair)
        counts.merge(pair)
    return merges


# -- vocabularies and GGUF files --------------------------------------------------

BPE_SPECIALS = [
    ("<|begin_of_text|>", TokenType.CONTROL),
    ("<|endoftext|>", TokenType.CONTROL),
    ("<|im_start|>", TokenType.CONTROL),
    ("<|im_end|>", TokenType.CONTROL),
    ("<tool_call>", TokenType.USER_DEFINED),
    ("<|fim_pad|>", TokenType.CONTROL),
    ("<mask>", TokenType.CONTROL),
    ("<|reserved_0|>", TokenType.UNUSED),
    ("<undefined>", 0),
]
# whole words that merges never build: only `ignore_merges` (llama3) can pick them
EXTRA_WORDS = [" television", " Lily", " upon", "ing", " 2024", " ñandú", "ello"]
RAW_TOKENS = ["€uro"]  # NORMAL but not byte-encoded: llama.cpp decodes it to an UNK_BYTE marker


def bpe_vocab(merges):
    """(tokens, token types, merge strings): specials, 256 bytes, merge results, extras."""
    tokens = [t for t, _ in BPE_SPECIALS] + list(BYTE_CHARS)
    types = [int(k) for _, k in BPE_SPECIALS] + [int(TokenType.NORMAL)] * 256
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
            types.append(int(TokenType.NORMAL))
    for word in EXTRA_WORDS:
        enc = "".join(BYTE_CHARS[b] for b in word.encode())
        if enc not in seen:
            seen.add(enc)
            tokens.append(enc)
            types.append(int(TokenType.NORMAL))
    tokens += RAW_TOKENS
    types += [int(TokenType.NORMAL)] * len(RAW_TOKENS)
    return tokens, types, [f"{a} {b}" for a, b in merges]


def write_vocab_gguf(
    path, model, tokens, types, *, merges=None, scores=None, pre=None, arch="llama", extra=None
):
    """A vocab-only GGUF file (no tensors) that llama.cpp loads with vocab_only=True.

    extra: {gguf key: value} written with the writer's typed helpers (bool, int, str).
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def read_metadata(path):
    """GGUF metadata as plain values (strings decoded, arrays as lists), as meldlite reads it."""
    from meldlite.formats import read_gguf

    return read_gguf(path).metadata


# -- corpus --------------------------------------------------------------------------

VARIED = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    " \t \n ",
    "a",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world",
    "Hello   world",
    "   leading",
    "trailing   ",
    "line one\nline two\r\nline three\n\n  indented\n\tTabbed",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "\"Can I have it?\" she asked. 'No,' said Mom. He's here; they're gone, we've won, I'm ok, you'll see, I'd go.",
    "HE'S THERE, THEY'RE HERE, WE'VE, I'M, YOU'LL, I'D, 'S 'T",
    "don't can't won't shouldn't 's 't 're 've 'm 'll 'd ' s",
    "Numbers: 0 7 42 123 1234 12345 3.14159 1,000,000 2024-01-01 +49 (0)30 1234567890123",
    "٣٤٥ ١٢٣ ½ ² Ⅻ 四十二",
    "Café crème brûlée, naïve façade, Ångström, Ørsted, Straße, ŽŠČ, İstanbul",
    "Ελληνικά κείμενα, русский текст, українська мова, ქართული",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "العربية نص مكتوب من اليمين إلى اليسار؛ עברית כתובה מימין לשמאל",
    "हिन्दी पाठ, বাংলা লেখা, தமிழ், ไทย ภาษา",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️ ✨🚀",
    "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] << 2 | c; } // done",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "$100 + 5% = ~ ^caret | pipe `backtick` @at #hash \\back /slash {brace} [bracket]",
    "...!!!???,,, ;;; ::: --- ___ *** ###",
    "<s> hello </s> <unk> <s></s><s>",
    "<|endoftext|>Hello<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant",
    'text<tool_call>{"name": "f"}</tool_call> and <|fim_pad|> and <|begin_of_text|>',
    "  <|endoftext|>  spaced  <|im_end|>  ",
    "mixed\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para\u0085nel end",
    "zero\u200bwidth\u200djoiner\ufeffbom \u0301combining e\u0301 a\u0308",
    "control \x01\x02\x1c\x1d\x1e\x1f\x7f chars",
    "private \ue000\uf8ff and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁 and unassigned \u0378\u0897\U0001fae9",
    "lone \ud800 surrogate \udfff",
    "x\u2581y \u2581 \u2581\u2581z",
    "max \U0010ffff",
    "  <mask>  x <mask>\n<mask>",
    "<|reserved_0|><undefined>",
    "a" * 300,
    "ab" * 150 + " " + "abc " * 50,
    "\n" * 20 + "x" + " " * 20 + "y",
]


def valid_stories(n=None):
    """Stories of valid.txt (text between `<|endoftext|>` separator lines)."""
    if not VALID_TXT.exists():
        return []
    stories = [s.strip("\n") for s in VALID_TXT.read_text().split("<|endoftext|>")]
    stories = [s for s in stories if s]
    return stories[:n] if n else stories


# -- llama.cpp oracle ------------------------------------------------------------------


class LlamaOracle:
    """llama.cpp's vocab of a GGUF file (llama-cpp-python, vocab_only=True)."""

    def __init__(self, path):
        llama_cpp = pytest.importorskip("llama_cpp")
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab

    def tokenize(self, text, add_bos=True, parse_special=False):
        return self.llm.tokenize(
            text.encode("utf-8", "surrogatepass"), add_bos=add_bos, special=parse_special
        )

    def n_vocab(self):
        return self.lib.llama_vocab_n_tokens(self.vocab)

    def is_eog(self, tid):
        return bool(self.lib.llama_vocab_is_eog(self.vocab, tid))

    def bos(self):
        return self.lib.llama_vocab_bos(self.vocab)

    def eos(self):
        return self.lib.llama_vocab_eos(self.vocab)

    def token_to_piece(self, tid, special):
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, tid, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, tid, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, ids, remove_special=False, unparse_special=False):
        arr = (self.lib.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 16 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_detokenize(
                self.vocab, arr, len(ids), buf, size, remove_special, unparse_special
            )
            if n >= 0:
                return buf.raw[:n]
            size = -n + 1
