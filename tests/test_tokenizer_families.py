"""Tokenizers of the families of issue 13 compared with llama.cpp (vocab_only).

Real vocabularies: llama.cpp's own test files (`models/ggml-vocab-*.gguf` in the
llama-cpp-python source distribution) where the family has one:

    deepseek2 (DeepSeek-V2, V2-Lite)  pre "deepseek-llm"    ggml-vocab-deepseek-llm.gguf
    DeepSeek-Coder(-V2)               pre "deepseek-coder"  ggml-vocab-deepseek-coder.gguf
    granitemoe (Granite 3.x)          pre "refact"          ggml-vocab-refact.gguf
    smallthinker (Qwen tokenizer)     pre "qwen2"           ggml-vocab-qwen2.gguf

Built vocabularies where there is none, written as vocab-only GGUF files:
gpt-oss (o200k_harmony: pre "gpt-4o", 201088 tokens, the harmony special
tokens at their real ids), DeepSeek-V3 (pre "deepseek-v3", its special tokens)
and Gemma 3 (SentencePiece, 262144 tokens, byte fallback, <start_of_turn> ...).
"""

import random
import time
from collections import Counter
from pathlib import Path

import pytest
from gguf import Keys, TokenType
from helpers_llamacpp_src import vocab_dir
from helpers_vocab import (
    BPE_SPECIALS,
    BYTE_CHARS,
    VARIED,
    LlamaOracle,
    bpe_vocab,
    read_metadata,
    train_bpe,
    valid_stories,
    write_vocab_gguf,
)
from test_tokenizer import (
    _training_text,
    assert_same_detokenize,
    assert_same_ids,
    random_texts,
)

from meldlite.tokenizer import Tokenizer

K = Keys.Tokenizer
FAMILY_VOCABS = ["deepseek-llm", "deepseek-coder", "refact", "qwen2"]
OTHER_VOCABS = [
    "gpt-2",
    "llama-bpe",
    "mpt",
    "falcon",
    "starcoder",
    "command-r",
    "qwen35",
    "llama-spm",
    "phi-3",
    "baichuan",
    "aquila",
    "gpt-neox",
]
CHAT_TEXTS = [
    "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜><think>\nok\n</think>Hello<｜end▁of▁sentence｜>",
    "<|im_start|>system\nYou are SmallThinker.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|start_of_role|>user<|end_of_role|>What is 7*6?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
    "<|start|>system<|message|>You are ChatGPT.\nReasoning: low<|end|><|start|>user<|message|>Hi<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
    "<|message|>Hello!<|return|>",
    "<bos><start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\nCherry  blossoms\tfall<end_of_turn>\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n\tprint(fib(30))  # 832040\n",
    "Zahlen: 1234567 3,14159 0x1F600 ½ ٣٤٥ Ⅻ; Symbole: © ® ™ € £ ¥ → ∑ ≤ ≥ ±; Ｆｕｌｌｗｉｄｔｈ！",
    "ǅungla ǈ Kelvin 5K Ωmega ʰaspirated ﬁne µs HTTPServer XMLHttpRequest iPhone McDonald's",
    "これは日本語のテストです。カタカナ、ひらがな、漢字。한국어 ㄱㄴㄷ 中文：你好，世界！",
]


def _vocab_path(name):
    folder = vocab_dir()
    path = folder / f"ggml-vocab-{name}.gguf" if folder else None
    if path is None or not path.exists():
        pytest.skip("llama.cpp's vocabularies unavailable (no PyPI; set MELDLITE_LLAMA_CPP_SRC)")
    return path


def _reference_tests(path):
    """llama.cpp's test texts (.inp) and the ids the converter's tokenizer gave (.out)."""
    inp, out = Path(f"{path}.inp"), Path(f"{path}.out")
    if not inp.exists():
        return [], []
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = [[int(t) for t in line.split()] for line in out.read_text().splitlines()]
    return texts, ids


def _corpus(extra=()):
    return VARIED + CHAT_TEXTS + valid_stories(3) + list(extra)


def assert_same_pieces_sampled(tok, oracle, ids):
    for tid in ids:
        for special in (False, True):
            assert tok.token_to_piece(tid, special=special) == oracle.token_to_piece(
                tid, special
            ), tid
        assert tok.is_eog(tid) == oracle.is_eog(tid), tid


def assert_same_random(tok, oracle, seed, n=300):
    for text, add_bos, special in random_texts(seed, n):
        ids = oracle.tokenize(text, add_bos, special)
        assert tok.encode(text, add_bos=add_bos, parse_special=special) == ids, text
        assert tok.decode_bytes(ids, special=True) == oracle.detokenize(ids, False, True), text


def _check_real(name):
    path = _vocab_path(name)
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (oracle.n_vocab(), oracle.bos(), oracle.eos())
    texts, want = _reference_tests(path)
    for text, ids in zip(texts, want):
        assert tok.encode(text, add_bos=False) == ids, text  # the converter's reference
    assert_same_ids(tok, oracle, _corpus(texts))
    assert_same_random(tok, oracle, len(name))
    assert_same_pieces_sampled(tok, oracle, range(tok.n_vocab))
    assert_same_detokenize(tok, oracle, CHAT_TEXTS + VARIED[16:30])
    return tok


@pytest.mark.parametrize("name", FAMILY_VOCABS)
def test_real_family_vocab_matches_llama_cpp(name):
    tok = _check_real(name)
    for text in CHAT_TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHER_VOCABS)
def test_other_real_vocab_matches_llama_cpp(name):
    _check_real(name)


# -- built vocabularies ------------------------------------------------------------


def _byte_encoded(text):
    return "".join(BYTE_CHARS[b] for b in text.encode())


@pytest.fixture(scope="module")
def trained_bpe():
    return bpe_vocab(train_bpe(_training_text() + "\n".join(CHAT_TEXTS * 3), 3000))


def _pad_to(tokens, types, n, prefix):
    """NORMAL filler tokens no merge builds, up to n tokens (byte-encoded, unique)."""
    seen, i = set(tokens), 0
    while len(tokens) < n:
        text = _byte_encoded(f"{prefix}{i:x}")
        i += 1
        if text not in seen:
            tokens.append(text)
            types.append(int(TokenType.NORMAL))


HARMONY = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
}
O200K_SIZE = 201088


def _o200k_like(tables):
    """201088 tokens: bytes, trained merges, fillers, then the harmony tokens at their ids."""
    tokens, types, merges = (list(x) for x in tables)
    del tokens[: len(BPE_SPECIALS)], types[: len(BPE_SPECIALS)]
    _pad_to(tokens, types, 199998, " o200k")
    for tid in range(199998, O200K_SIZE):
        tokens.append(HARMONY.get(tid, f"<|reserved_{tid}|>"))
        types.append(int(TokenType.CONTROL))
    return tokens, types, merges


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, trained_bpe):
    tokens, types, merges = _o200k_like(trained_bpe)
    path = write_vocab_gguf(
        tmp_path_factory.mktemp("gptoss") / "o200k.gguf",
        "gpt2",
        tokens,
        types,
        merges=merges,
        pre="gpt-4o",
        arch="gpt-oss",
        extra={K.BOS_ID: 199998, K.EOS_ID: 200002, K.PAD_ID: 199999},
    )
    return Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)


def test_gpt_oss_o200k_like_vocab_matches_llama_cpp(gpt_oss):
    tok, oracle = gpt_oss
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (O200K_SIZE, 199998, 200002)
    assert not tok.add_bos  # gpt-4o's default, the converter writes no add_bos_token
    assert_same_ids(tok, oracle, _corpus())
    assert_same_random(tok, oracle, 200)
    sample = [
        *range(4000),
        *range(199990, O200K_SIZE),
        *random.Random(0).sample(range(O200K_SIZE), 2000),
    ]
    assert_same_pieces_sampled(tok, oracle, sample)
    assert_same_detokenize(tok, oracle, CHAT_TEXTS)
    # harmony: <|return|> and <|call|> end generation, <|end|> does not (llama.cpp's workaround)
    assert {200002, 200012} <= tok.eog_ids and 200007 not in tok.eog_ids
    ids = tok.encode(CHAT_TEXTS[3], add_bos=False, parse_special=True)
    assert ids[0] == 200006 and ids[-1] == 200002
    assert tok.decode(ids, special=True) == CHAT_TEXTS[3]
    # <|start|> <|channel|> <|message|> (and <|end|>) are rendered even without special
    assert tok.decode(ids) == CHAT_TEXTS[3].removesuffix("<|return|>")


DEEPSEEK3_SPECIALS = [
    ("<｜begin▁of▁sentence｜>", TokenType.CONTROL),
    ("<｜end▁of▁sentence｜>", TokenType.CONTROL),
    ("<｜▁pad▁｜>", TokenType.CONTROL),
    ("<｜fim▁hole｜>", TokenType.USER_DEFINED),
    ("<｜fim▁begin｜>", TokenType.USER_DEFINED),
    ("<｜fim▁end｜>", TokenType.USER_DEFINED),
    ("<｜User｜>", TokenType.USER_DEFINED),
    ("<｜Assistant｜>", TokenType.USER_DEFINED),
    ("<think>", TokenType.USER_DEFINED),
    ("</think>", TokenType.USER_DEFINED),
    ("<｜tool▁calls▁begin｜>", TokenType.USER_DEFINED),
]


@pytest.fixture(scope="module")
def deepseek3(tmp_path_factory, trained_bpe):
    tokens, types, merges = (list(x) for x in trained_bpe)
    base = len(tokens)
    tokens += [t for t, _ in DEEPSEEK3_SPECIALS]
    types += [int(k) for _, k in DEEPSEEK3_SPECIALS]
    path = write_vocab_gguf(
        tmp_path_factory.mktemp("dsv3") / "deepseek-v3.gguf",
        "gpt2",
        tokens,
        types,
        merges=merges,
        pre="deepseek-v3",
        arch="deepseek2",
        extra={K.BOS_ID: base, K.EOS_ID: base + 1, K.PAD_ID: base + 2, K.ADD_BOS: True},
    )
    return Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)


def test_deepseek_v3_vocab_matches_llama_cpp(deepseek3):
    tok, oracle = deepseek3
    assert tok.add_bos and not tok.add_eos
    assert_same_ids(tok, oracle, _corpus())
    assert_same_random(tok, oracle, 3)
    assert_same_pieces_sampled(tok, oracle, range(tok.n_vocab))
    assert_same_detokenize(tok, oracle, CHAT_TEXTS)
    assert tok.eos_id in tok.eog_ids


# -- Gemma 3: SentencePiece, 262144 tokens ----------------------------------------------

GEMMA3_SIZE = 262144
SPACE = "\u2581"
# as in published Gemma 3 files: <unk> is CONTROL (types 3 3 3 3 3 4 3 3 ...), scores -1000
GEMMA3_HEAD = [
    ("<pad>", TokenType.CONTROL),
    ("<eos>", TokenType.CONTROL),
    ("<bos>", TokenType.CONTROL),
    ("<unk>", TokenType.CONTROL),
    ("<mask>", TokenType.CONTROL),
    ("[@BOS@]", TokenType.USER_DEFINED),
    *[(f"<unused{i}>", TokenType.CONTROL) for i in range(98)],
    ("<unused98>", TokenType.UNUSED),
    ("<start_of_turn>", TokenType.CONTROL),
    ("<end_of_turn>", TokenType.CONTROL),
    *[("\n" * n, TokenType.NORMAL) for n in range(1, 32)],
    *[(SPACE * n, TokenType.NORMAL) for n in range(2, 32)],
    *[("\t" * n, TokenType.NORMAL) for n in range(1, 32)],
    ("<table>", TokenType.USER_DEFINED),
    ("<h1>", TokenType.USER_DEFINED),
    ("</h1>", TokenType.USER_DEFINED),
    ("<a href=", TokenType.USER_DEFINED),
    ("<start_of_image>", TokenType.CONTROL),
    ("<end_of_image>", TokenType.CONTROL),
    *[(f"<0x{b:02X}>", TokenType.BYTE) for b in range(256)],
]
# filler characters: scripts a 262k multilingual vocabulary is full of
FILLER_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éèüößçñ"
    + "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))
    + "".join(chr(c) for c in range(0x3041, 0x3097))
    + "".join(chr(c) for c in range(0xAC00, 0xAC00 + 200))
    + "абвгдежзийклмнопрстуфхцчшщыэюяαβγδεζηθικλμνξοπρστυφχψω"
    + "😀😃👍🚀✨❤"
    + SPACE * 8
)


def _sp_pieces(text, n_pieces):
    """(piece, score) of frequent words (with the U+2581 prefix), their substrings and
    every character of `text`, highest count first; scores are log-frequency-like."""
    text = text.encode("utf-8", "ignore").decode()  # no lone surrogates in GGUF strings
    counts = Counter()
    for word, n in Counter(text.replace("\n", " ").split(" ")).items():
        w = SPACE + word[:16]
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + 6) + 1):
                counts[w[i:j]] += n
    ranked = [p for p, _ in counts.most_common() if p != SPACE]
    chars = sorted({c for c in text if c not in "\n"} - {" "})
    pieces = ranked[:n_pieces]
    taken = set(pieces)
    pieces += [c for c in chars if c not in taken]
    return [(p, -1.0 - 0.0001 * i) for i, p in enumerate(pieces)]


def gemma3_like_vocab(text, seed=0):
    tokens = [t for t, _ in GEMMA3_HEAD]
    types = [int(k) for _, k in GEMMA3_HEAD]
    scores = [0.0 if k == TokenType.NORMAL else -1000.0 for _, k in GEMMA3_HEAD]
    seen = set(tokens)
    for piece, score in _sp_pieces(text, 40000):
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
            scores.append(score)
    rng = random.Random(seed)
    while len(tokens) < GEMMA3_SIZE - 1:
        piece = "".join(rng.choice(FILLER_POOL) for _ in range(rng.randrange(2, 5)))
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
            scores.append(-20.0 - 10.0 * rng.random())
    tokens.append("<image_soft_token>")
    types.append(int(TokenType.CONTROL))
    scores.append(0.0)
    return tokens, types, scores


@pytest.fixture(scope="module")
def gemma3_file(tmp_path_factory):
    text = _training_text() + "\n".join(CHAT_TEXTS * 3)
    tokens, types, scores = gemma3_like_vocab(text)
    return write_vocab_gguf(
        tmp_path_factory.mktemp("gemma3") / "gemma3.gguf",
        "llama",
        tokens,
        types,
        scores=scores,
        pre="default",
        arch="gemma3",
        extra={
            K.BOS_ID: 2,
            K.EOS_ID: 1,
            K.UNK_ID: 3,
            K.PAD_ID: 0,
            K.ADD_BOS: True,
            K.ADD_EOS: False,
            K.ADD_PREFIX: False,
        },
    )


@pytest.fixture(scope="module")
def gemma3(gemma3_file):
    return Tokenizer.from_metadata(read_metadata(gemma3_file)), LlamaOracle(gemma3_file)


def test_gemma3_spm_vocab_matches_llama_cpp(gemma3):
    tok, oracle = gemma3
    assert (tok.n_vocab, tok.bos_id, tok.eos_id) == (GEMMA3_SIZE, 2, 1)
    assert tok.add_bos and not tok.add_eos and not tok.vocab.add_space_prefix
    assert_same_ids(tok, oracle, _corpus())
    assert_same_random(tok, oracle, 262)
    sample = [*range(2000), *random.Random(1).sample(range(GEMMA3_SIZE), 3000), GEMMA3_SIZE - 1]
    assert_same_pieces_sampled(tok, oracle, sample)
    assert_same_detokenize(tok, oracle, CHAT_TEXTS)
    end_of_turn = tok.vocab.token_to_id["<end_of_turn>"]
    assert tok.eot_id == end_of_turn and tok.is_eog(end_of_turn)
    ids = tok.encode(CHAT_TEXTS[4], add_bos=False, parse_special=True)
    assert ids[:2] == [2, tok.vocab.token_to_id["<start_of_turn>"]]


def test_gemma3_vocab_loads_quickly(gemma3_file):
    """The 262k vocabulary: GGUF read + tables, measured (the figure goes to the report)."""
    import tracemalloc

    t0 = time.perf_counter()
    md = read_metadata(gemma3_file)
    t1 = time.perf_counter()
    tracemalloc.start()
    tok = Tokenizer.from_metadata(md)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t2 = time.perf_counter()
    print(f"gemma3 262k: read {t1 - t0:.2f} s, tables {t2 - t1:.2f} s, peak {peak / 2**20:.0f} MiB")
    assert tok.n_vocab == GEMMA3_SIZE
    assert t2 - t1 < 10 and peak < 400 * 2**20


# -- Granite 3.x: the refact vocabulary with Granite's special tokens and flags --------

GRANITE_ROLES = ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"]


def test_granite_vocab_matches_llama_cpp(tmp_path):
    """Granite 3 files: pre "refact", token 0 <|end_of_text|> is BOS, EOS, UNK and PAD,
    add_bos_token false, role tokens added as CONTROL."""
    md = read_metadata(_vocab_path("refact"))
    tokens = ["<|end_of_text|>", *md[K.LIST][1:], *GRANITE_ROLES]
    types = [int(TokenType.CONTROL), *md[K.TOKEN_TYPE][1:]]
    types += [int(TokenType.CONTROL)] * len(GRANITE_ROLES)
    path = write_vocab_gguf(
        tmp_path / "granite.gguf",
        "gpt2",
        tokens,
        types,
        merges=md[K.MERGES],
        pre="refact",
        arch="granitemoe",
        extra={K.BOS_ID: 0, K.EOS_ID: 0, K.UNK_ID: 0, K.PAD_ID: 0, K.ADD_BOS: False},
    )
    tok, oracle = Tokenizer.from_metadata(read_metadata(path)), LlamaOracle(path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (0, 0, False)
    assert_same_ids(tok, oracle, _corpus())
    assert_same_pieces_sampled(tok, oracle, [*range(200), *range(len(tokens) - 10, len(tokens))])
    assert_same_detokenize(tok, oracle, CHAT_TEXTS[:3])
    ids = tok.encode(CHAT_TEXTS[2], parse_special=True)
    assert ids[0] == len(tokens) - 3 and 0 in ids and tok.is_eog(0)
