"""Tokenizer parity with llama.cpp (llama-cpp-python, vocab_only=True).

SPM: the trained tinystories model's vocab (and variants of it with other flags).
BPE: byte-level vocabularies trained here on valid.txt and the repo's own text,
written as vocab-only GGUF files, one per supported `tokenizer.ggml.pre`.
Unicode classes: vocabularies whose merges reveal, code point by code point,
whether llama.cpp's pre-tokenizer joins a character to a letter/number/
punctuation/mark run.
Oracle tests skip when llama-cpp-python is not installed.
"""

import random
import time

import pytest
from gguf import Keys, TokenType
from helpers_vocab import (
    BPE_SPECIALS,
    BYTE_CHARS,
    REPO,
    TINYSTORIES,
    VARIED,
    LlamaOracle,
    bpe_vocab,
    read_metadata,
    train_bpe,
    valid_stories,
    write_vocab_gguf,
)

from meldlite.errors import FormatError, OptionError, UnsupportedError
from meldlite.tokenizer import StreamDecoder, Tokenizer, unicode_data
from meldlite.tokenizer.pretokenize import HAN_RANGES
from meldlite.tokenizer.vocab import MergeRanks

K = Keys.Tokenizer
needs_model = pytest.mark.skipif(not TINYSTORIES.exists(), reason="shared/models not present")
FLAGS = [(True, False), (False, False), (True, True), (False, True)]  # (add_bos, parse_special)


def assert_same_ids(tok, oracle, texts, flags=FLAGS):
    for text in texts:
        for add_bos, special in flags:
            want = oracle.tokenize(text, add_bos, special)
            got = tok.encode(text, add_bos=add_bos, parse_special=special)
            assert got == want, f"text={text[:80]!r} add_bos={add_bos} special={special}"


def assert_same_pieces(tok, oracle):
    assert tok.n_vocab == oracle.n_vocab()
    for tid in range(tok.n_vocab):
        for special in (False, True):
            assert tok.token_to_piece(tid, special=special) == oracle.token_to_piece(
                tid, special
            ), tid
        assert tok.is_eog(tid) == oracle.is_eog(tid), tid


def assert_same_detokenize(tok, oracle, texts):
    for text in texts:
        for add_bos, special in FLAGS:
            ids = oracle.tokenize(text, add_bos, special)
            for remove, unparse in FLAGS:
                want = oracle.detokenize(ids, remove, unparse)
                assert tok.decode_bytes(ids, special=unparse, remove_special=remove) == want, (
                    f"text={text[:60]!r} ids={ids[:10]} remove={remove} unparse={unparse}"
                )


# -- SPM: the tinystories model ----------------------------------------------------


@pytest.fixture(scope="module")
def spm_tok():
    if not TINYSTORIES.exists():
        pytest.skip("shared/models not present")
    return Tokenizer.from_metadata(read_metadata(TINYSTORIES))


@pytest.fixture(scope="module")
def spm(spm_tok):
    return spm_tok, LlamaOracle(TINYSTORIES)


@needs_model
def test_spm_properties(spm):
    tok, oracle = spm
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (4096, oracle.bos(), oracle.eos())
    assert tok.add_bos and not tok.add_eos


@needs_model
def test_spm_ids_match_llama_cpp_on_varied_text(spm):
    assert_same_ids(*spm, VARIED)


@needs_model
def test_spm_ids_match_llama_cpp_on_stories(spm):
    stories = valid_stories(40)
    assert_same_ids(*spm, stories, flags=[(True, False)])
    assert_same_ids(*spm, ["\n".join(stories[:10])], flags=[(True, False), (False, True)])


@needs_model
def test_spm_pieces_and_eog_match_llama_cpp(spm):
    assert_same_pieces(*spm)


@needs_model
def test_spm_detokenize_matches_llama_cpp(spm):
    assert_same_detokenize(*spm, VARIED[:40] + valid_stories(3))


@needs_model
def test_spm_round_trip(spm_tok):
    tok = spm_tok
    for text in VARIED + valid_stories(10):
        if "\u2581" in text:
            continue  # a literal U+2581 decodes to " ", in llama.cpp too
        ids = tok.encode(text, add_bos=False)
        assert tok.decode_bytes(ids) == text.encode("utf-8", "surrogatepass")
        if "\ud800" not in text:
            assert tok.decode(ids) == text
    ids = tok.encode("Once upon a time")
    assert tok.decode(ids[1:]) == "Once upon a time"
    assert tok.decode(ids) == " Once upon a time"  # after BOS llama.cpp keeps the space
    assert tok.decode(ids, remove_special=True) == " Once upon a time"


def _spm_variant(tmp_path, md, name, *, add_tokens=(), extra=None, general_name=None):
    tokens = list(md[K.LIST]) + [t for t, _ in add_tokens]
    types = list(md[K.TOKEN_TYPE]) + [int(k) for _, k in add_tokens]
    scores = list(md[K.SCORES]) + [0.0] * len(add_tokens)
    extra = dict(extra or {})
    if general_name:
        extra[Keys.General.NAME] = general_name
    path = write_vocab_gguf(
        tmp_path / f"{name}.gguf", "llama", tokens, types, scores=scores, extra=extra
    )
    return Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)


SPM_VARIANTS = {
    "no_space_prefix": dict(extra={K.ADD_PREFIX: False}),
    "eos_no_bos": dict(extra={K.ADD_BOS: False, K.ADD_EOS: True}),
    "specials": dict(
        add_tokens=[
            ("<|user|>", TokenType.USER_DEFINED),
            ("<ctl>", TokenType.CONTROL),
            ("<|im_end|>", TokenType.NORMAL),
            ("<unused7>", TokenType.UNUSED),
        ]
    ),
    # tokens with U+2581 inside: merges across the cut points of the SPM speed-up
    "inner_spaces": dict(
        add_tokens=[
            ("\u2581\u2581", TokenType.NORMAL),
            ("e\u2581t", TokenType.NORMAL),
            ("\u2581\u2581\u2581\u2581", TokenType.NORMAL),
            (".\u2581", TokenType.NORMAL),
        ]
    ),
    # llama.cpp refuses a "phi-3" vocab without <|endoftext|>
    "phi3_rstrip": dict(
        add_tokens=[
            ("<|user|>", TokenType.USER_DEFINED),
            ("<|end|>", TokenType.CONTROL),
            ("<|endoftext|>", TokenType.CONTROL),
        ],
        general_name="Phi-3 test",
    ),
}
SPM_VARIANT_TEXTS = (
    VARIED
    + valid_stories(2)
    + [
        "<|user|> hi <ctl> there <|im_end|>  <|user|>\n<|end|>  x",
        " <|user|>",
        "<|user|> ",
        "a<|end|>\n\n b <|user|>  c",
        "<unused7><s>",
    ]
)


@needs_model
@pytest.mark.parametrize("variant", sorted(SPM_VARIANTS))
def test_spm_variants_match_llama_cpp(tmp_path, variant):
    tok, oracle = _spm_variant(
        tmp_path, read_metadata(TINYSTORIES), variant, **SPM_VARIANTS[variant]
    )
    assert (tok.bos_id, tok.eos_id) == (oracle.bos(), oracle.eos())
    assert_same_ids(tok, oracle, SPM_VARIANT_TEXTS)
    assert_same_pieces(tok, oracle)
    assert_same_detokenize(tok, oracle, SPM_VARIANT_TEXTS[-5:])


# -- BPE: trained byte-level vocabularies -------------------------------------------


def _training_text():
    parts = valid_stories(200) + VARIED * 3
    parts += [p.read_text() for p in sorted((REPO / "meldlite").rglob("*.py"))[:40]]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def bpe_tables():
    return bpe_vocab(train_bpe(_training_text(), 3000))


# test name -> (tokenizer.ggml.pre or None for no key, extra metadata)
BPE_CASES = {
    pre: (pre, {})
    for pre in (
        "default",
        "gpt-2",
        "olmo",
        "mpt",
        "trillion",
        "jina-v2-de",
        "llama3",
        "llama-bpe",
        "llama-v3",
        "dbrx",
        "smaug-bpe",
        "qwen2",
        "deepseek-r1-qwen",
        "stablelm2",
        "qwen35",
        "falcon",
        "starcoder",
        "command-r",
        "chatglm-bpe",
        "glm4",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "gpt-4o",
        "tekken",
        "granite-embed-multi-97m",
        "poro-chat",
        "viking",
        "bloom",
    )
}
BPE_CASES.update(
    {
        "no-pre": (None, {}),
        "megrez-bos-eos": ("megrez", {K.ADD_EOS: True, K.ADD_BOS: True}),
        "smollm-space-prefix": ("smollm", {K.ADD_PREFIX: True}),
        "gpt-2-eot-id": ("gpt-2", {K.EOT_ID: 2, K.ADD_BOS: True}),
    }
)


def _bpe_file(tmp_path, tables, pre, extra, name=None):
    tokens, types, merges = tables
    ids = {t: i for i, t in enumerate(tokens)}
    meta = {K.BOS_ID: ids["<|begin_of_text|>"], K.EOS_ID: ids["<|endoftext|>"], **extra}
    arch = "qwen2" if pre and "qwen" in pre else "llama"
    return write_vocab_gguf(
        tmp_path / f"bpe-{name or pre}.gguf",
        "gpt2",
        tokens,
        types,
        merges=merges,
        pre=pre,
        arch=arch,
        extra=meta,
    )


@pytest.mark.parametrize("case", list(BPE_CASES))
def test_bpe_matches_llama_cpp(tmp_path, bpe_tables, case):
    pre, extra = BPE_CASES[case]
    path = _bpe_file(tmp_path, bpe_tables, pre, extra, name=case)
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    assert (tok.bos_id, tok.eos_id) == (oracle.bos(), oracle.eos())
    assert_same_ids(tok, oracle, VARIED + valid_stories(3))
    assert_same_pieces(tok, oracle)
    assert_same_detokenize(tok, oracle, VARIED[16:30])


# pre-tokenizers of other families: a lighter check (their regexes are llama.cpp's,
# run by the same machinery as the cases above)
MORE_PRES = [
    "seed-coder",
    "ufakzeka",
    "spark2_5",
    "youtu",
    "laguna",
    "chameleon",
    "bailingmoe",
    "minicpm5",
    "exaone-moe",
    "jais-2",
    "gpt3-finnish",
    "kimi-k2",
]
MORE_TEXTS = [
    "<sentinel:12>IMGIMGABZ IMGIMGAAAAAZ x    y  z",
    " " * 600 + "x" + "\t" * 70 + "y\n\n" + " " * 33,
    "한국어 ㄱㄴ！…“quoted”—：；，、〃︰ ㄅㄆ 日本語のカタカナ",
    "Crème BRÛLÉE McDonald'S ǅungla e\u0301e\u0301 a b c 1234567 ½",
    "中文abc日本語テキスト!日 한국어 𠀀𪛟\U0002a6e0 \uf900\ufaff's X'LL",
]


@pytest.mark.parametrize("pre", MORE_PRES)
def test_more_pre_tokenizers_match_llama_cpp(tmp_path, bpe_tables, pre):
    path = _bpe_file(tmp_path, bpe_tables, pre, {})
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    assert_same_ids(tok, oracle, VARIED + MORE_TEXTS, flags=[(True, False), (False, True)])
    for text, add_bos, special in random_texts(len(pre), 100):
        assert tok.encode(text, add_bos=add_bos, parse_special=special) == oracle.tokenize(
            text, add_bos, special
        ), text
    assert_same_detokenize(tok, oracle, [*VARIED[16:20], *MORE_TEXTS[2:]])


def test_bpe_ignore_merges_takes_whole_words(tmp_path, bpe_tables):
    tok = Tokenizer.from_metadata(read_metadata(_bpe_file(tmp_path, bpe_tables, "llama3", {})))
    word = "".join(BYTE_CHARS[b] for b in b" television")
    assert tok.encode(" television", add_bos=False) == [tok.vocab.token_to_id[word]]


def test_bpe_eog_and_special_tokens(tmp_path, bpe_tables):
    tok = Tokenizer.from_metadata(read_metadata(_bpe_file(tmp_path, bpe_tables, "qwen2", {})))
    ids = {t: i for i, (t, _) in enumerate(BPE_SPECIALS)}
    assert tok.eog_ids == {ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|fim_pad|>"]}
    assert tok.encode("<tool_call>", add_bos=False) == [ids["<tool_call>"]]  # USER_DEFINED: always
    assert tok.encode("<|im_end|>", add_bos=False, parse_special=True) == [ids["<|im_end|>"]]
    assert ids["<|im_end|>"] not in tok.encode("<|im_end|>", add_bos=False)


# -- Unicode classes, code point by code point ---------------------------------------


def _class_sample(seed=0):
    """Range ends of every class, their outside neighbours, and random code points."""
    cpts = set()
    for table in (
        unicode_data.LETTER,
        unicode_data.NUMBER,
        unicode_data.PUNCTUATION,
        unicode_data.MARK,
        unicode_data.SYMBOL,
    ):
        for a, b in table:
            cpts.update((a - 1, a, b, b + 1))
    rng = random.Random(seed)
    cpts.update(rng.randrange(0x80, 0x110000) for _ in range(400))
    cpts.update(range(0x0897, 0x089A))  # Unicode 16 additions: undefined for llama.cpp
    for a, b in HAN_RANGES:  # Kimi-K2's Han ranges (unassigned code points at some ends)
        cpts.update((a - 1, a, b, b + 1))
    return sorted(c for c in cpts if 0x80 <= c < 0x110000 and not 0xD800 <= c < 0xE000)


def _probe_vocab(chars, leads):
    """Merges that build each char's bytes, then `lead + char` for every lead."""
    tokens, merges, seen = list(BYTE_CHARS) + ["<|endoftext|>"], [], set(BYTE_CHARS)

    def add(a, b):
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append(f"{a} {b}")

    encoded = ["".join(BYTE_CHARS[b] for b in ch.encode()) for ch in chars]
    for enc in encoded:
        for i in range(2, len(enc) + 1):
            add(enc[: i - 1], enc[i - 1])
    for lead in leads:
        for enc in encoded:
            add(lead, enc)
    types = [int(TokenType.NORMAL)] * (len(tokens) - 1)
    types.insert(256, int(TokenType.CONTROL))
    return tokens, types, merges


# pre -> lead character: a word "<lead><char>" stays whole (and merges into one token)
# only if llama.cpp puts <char> in the same class run as <lead>
CLASS_PROBES = {
    "llama3": ["x", "1"],
    "default": ["!"],
    "qwen35": ["x"],
    "deepseek-v3": ["!"],
    "kimi-k2": ["x"],
}


@pytest.mark.parametrize("pre", sorted(CLASS_PROBES))
def test_unicode_classes_match_llama_cpp(tmp_path, pre):
    chars = [chr(c) for c in _class_sample()]
    tokens, types, merges = _probe_vocab(chars, CLASS_PROBES[pre])
    path = write_vocab_gguf(
        tmp_path / f"probe-{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre
    )
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    for lead in CLASS_PROBES[pre]:
        for i in range(0, len(chars), 200):
            text = "\n".join(lead + ch for ch in chars[i : i + 200])
            assert tok.encode(text, add_bos=False) == oracle.tokenize(text, False), (
                f"lead {lead!r}, chars U+{ord(chars[i]):04X}..U+{ord(chars[i + 199 if i + 199 < len(chars) else -1]):04X}"
            )


# -- random strings ----------------------------------------------------------------

FUZZ_ALPHABET = list("abcXYZ019 \t\n\r'sStTdDmMlLrReEvV.,!?$+<=>^~|`-_\"()[]{}\\/@#%&*;:") + [
    "\u00a0",
    "\u2003",
    "\u3000",
    "\u0085",
    "\u2028",
    "é",
    "ß",
    "日",
    "😀",
    "\u0301",
    "٣",
    "½",
    "Ⅻ",
    "\x0b",
    "\x1c",
    "\x00",
    "\u200b",
    "\u0378",
    "\u0897",
    "\u2581",
    "<|endoftext|>",
    "<|im_start|>",
    "<mask>",
    "<tool_call>",
    "<s>",
    "</s>",
    "'s",
    "'LL",
    "'Re",
    "123",
    "4567",
    # DeepSeek's literal ranges, symbols (\\p{S}), case runs (gpt-4o)
    "\u212a",
    "\uff21",
    "\uff01",
    "\u2018",
    "\u30fc",
    "\uac00",
    "\u0800",
    "\u01c5",
    "\u02b0",
    "\u00a9",
    "\u20ac",
    "HTTPServer",
    "#x",
]


def random_texts(seed, n):
    rng = random.Random(seed)
    return [
        (
            "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randrange(30))),
            rng.random() < 0.5,
            rng.random() < 0.5,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "pre",
    [
        "spm",
        "default",
        "gpt-2",
        "llama3",
        "qwen2",
        "qwen35",
        "jina-v2-de",
        "deepseek-llm",
        "deepseek-coder",
        "deepseek-v3",
        "gpt-4o",
    ],
)
def test_random_strings_match_llama_cpp(tmp_path, bpe_tables, pre):
    if pre == "spm" and not TINYSTORIES.exists():
        pytest.skip("shared/models not present")
    path = TINYSTORIES if pre == "spm" else _bpe_file(tmp_path, bpe_tables, pre, {})
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    for text, add_bos, special in random_texts(len(pre), 400):
        ids = oracle.tokenize(text, add_bos, special)
        assert tok.encode(text, add_bos=add_bos, parse_special=special) == ids, (
            text,
            add_bos,
            special,
        )
        assert tok.decode_bytes(ids, special=True) == oracle.detokenize(ids, False, True), text


# -- errors ---------------------------------------------------------------------------


def _bpe_meta(**changes):
    tokens = list(BYTE_CHARS) + ["<|endoftext|>"]
    md = {
        K.MODEL: "gpt2",
        K.PRE: "gpt-2",
        K.LIST: tokens,
        K.TOKEN_TYPE: [1] * 256 + [3],
        K.MERGES: ["Ġ t"],
    }
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


def test_unsupported_model_lists_supported():
    with pytest.raises(UnsupportedError, match="llama, gpt2"):
        Tokenizer.from_metadata(_bpe_meta(**{K.MODEL: "bert"}))


def test_unknown_pre_is_unsupported_as_in_llama_cpp(tmp_path):
    with pytest.raises(UnsupportedError, match="gpt-2"):
        Tokenizer.from_metadata(_bpe_meta(**{K.PRE: "gpt2"}))  # llama.cpp's name is "gpt-2"
    md = _bpe_meta(**{K.PRE: "gpt2"})
    path = write_vocab_gguf(
        tmp_path / "bad-pre.gguf",
        "gpt2",
        md[K.LIST],
        md[K.TOKEN_TYPE],
        merges=md[K.MERGES],
        pre="gpt2",
    )
    with pytest.raises(ValueError):
        LlamaOracle(path)


@pytest.mark.parametrize(
    "changes",
    [
        {K.LIST: None},
        {K.LIST: []},
        {K.LIST: "abc"},
        {K.LIST: ["a", "a"]},
        {K.LIST: ["a", 3]},
        {K.TOKEN_TYPE: [1, 1]},
        {K.SCORES: [0.0] * 5},
        {K.MERGES: None},
        {K.MODEL: None},
        {K.MODEL: 7},
        {K.BOS_ID: "x"},
        {K.ADD_BOS: "yes"},
    ],
    ids=lambda c: ",".join(f"{k.split('.')[-1]}={str(v)[:8]}" for k, v in c.items()),
)
def test_malformed_metadata_is_format_error(changes):
    with pytest.raises(FormatError):
        Tokenizer.from_metadata(_bpe_meta(**changes))


def test_out_of_range_ids_are_option_errors():
    tok = Tokenizer.from_metadata(_bpe_meta())
    with pytest.raises(OptionError):
        tok.token_to_piece(tok.n_vocab)
    with pytest.raises(OptionError):
        tok.decode([0, -1])
    with pytest.raises(OptionError):
        tok.encode(b"bytes")


def test_merge_ranks_are_llama_cpp_pairs():
    """MergeRanks (keyed by the merge strings) answers as the table of (left, right) pairs
    llama.cpp builds: split at the first space after the first character, first rank kept."""
    merges = ["a b", "ab c", " x y", "  z", "a b", "p q r", "nospace", "t ", " ", "ab c"]
    pairs = {}
    for rank, m in enumerate(merges):
        pos = m.find(" ", 1)
        pairs.setdefault((m[:pos], m[pos + 1 :]) if pos >= 0 else ("", ""), rank)
    ranks = MergeRanks(merges)
    sides = {s for pair in pairs for s in pair if s} | {"p q", "r", " x", "x", "y", " ", "t"}
    for left in sides:
        for right in sides:
            assert ranks.get((left, right)) == pairs.get((left, right)), (left, right)


# -- streaming ----------------------------------------------------------------------


@needs_model
def test_stream_decoder_buffers_partial_utf8(spm_tok):
    tok = spm_tok
    text = "Emoji 😀 and 日本語 done"
    ids = tok.encode(text, add_bos=False)
    stream = StreamDecoder(tok)
    out = [stream.push(i) for i in ids]
    assert "".join(out) + stream.flush() == " " + text  # pieces keep the SPM prefix space
    assert all("\ufffd" not in piece for piece in out)
    assert "" in out  # a byte token alone completes nothing


# -- speed ---------------------------------------------------------------------------


@needs_model
def test_spm_encodes_100kb_quickly(spm):
    tok, oracle = spm
    text = "\n".join(valid_stories())[:100_000]
    t0 = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t0 < 10
    assert ids == oracle.tokenize(text)


@pytest.mark.slow
@needs_model
def test_whole_valid_txt_matches_llama_cpp(tmp_path, spm, bpe_tables):
    text = "\n".join(valid_stories())
    tok, oracle = spm
    assert tok.encode(text) == oracle.tokenize(text)
    for pre in ("llama3", "qwen2", "default"):
        path = _bpe_file(tmp_path, bpe_tables, pre, {})
        bpe = Tokenizer.from_metadata(read_metadata(path))
        assert bpe.encode(text) == LlamaOracle(path).tokenize(text)
