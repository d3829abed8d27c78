"""Byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`), as llama.cpp's
`llm_tokenizer_bpe_session`: pre-tokenize into words, write each word's UTF-8
bytes as GPT-2 stand-in characters, then repeatedly merge the adjacent pair of
lowest merge rank (leftmost on ties).  With `ignore_merges` a word that is a
token is taken whole.  Symbols that are not tokens fall back to one token per
byte (bytes without a token are dropped, as llama.cpp does).
"""

from meldlite.tokenizer.merge import merge_pairs
from meldlite.tokenizer.pretokenize import byte_encode, pretokenizer

_CACHE_LIMIT = 1 << 16


class BpeEncoder:
    """Encodes raw text (no special tokens in it) to token ids."""

    def __init__(self, vocab):
        self.token_to_id = vocab.token_to_id
        self.ranks = vocab.merges
        self.ignore_merges = vocab.pre_type.ignore_merges
        self.pretokenizer = pretokenizer(vocab.pre_type)
        self._cache = {}

    def encode(self, text):
        ids = []
        for word in self.pretokenizer.split(text):
            ids.extend(self._encode_word(byte_encode(word)))
        return ids

    def _encode_word(self, word):
        ids = self._cache.get(word)
        if ids is None:
            ids = self._word_ids(word)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _word_ids(self, word):
        if self.ignore_merges and word in self.token_to_id:
            return [self.token_to_id[word]]
        ids = []
        for sym in merge_pairs(word, self._rank):
            tid = self.token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_ids(sym))
        return ids

    def _rank(self, left, right):
        return self.ranks.get((left, right))

    def _byte_ids(self, sym):
        """One token per UTF-8 byte of `sym` (only ASCII bytes can be tokens)."""
        out = []
        for b in sym.encode("utf-8"):
            tid = self.token_to_id.get(chr(b)) if b < 0x80 else None
            if tid is not None:
                out.append(tid)
        return out
