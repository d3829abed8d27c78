"""SentencePiece-style tokenizer (`tokenizer.ggml.model = "llama"`), as llama.cpp's
`llm_tokenizer_spm_session`: start from single code points, repeatedly merge the
adjacent pair whose concatenation is the highest-scoring token (leftmost on
ties), then emit each symbol as its token or, failing that, as byte tokens
`<0xXX>`.

Speed: no token can grow across a cut between two code points `a`, `b` if no
token text contains `ab`; merging is then independent on both sides.  The text
is cut before every U+2581 (the escaped space) whose left neighbour never
precedes U+2581 inside a token, and each piece is tokenized once and cached.
"""

from meldlite.errors import FormatError
from meldlite.tokenizer.merge import merge_pairs

SPACE = "\u2581"  # what llama.cpp writes for ' ' before SPM tokenizing
_CACHE_LIMIT = 1 << 16


class SpmEncoder:
    """Encodes escaped text (spaces already U+2581) to token ids."""

    def __init__(self, vocab):
        self.token_to_id = vocab.token_to_id
        self.scores = vocab.scores
        self._byte_ids = [_byte_token(vocab.token_to_id, b) for b in range(256)]
        self._unsafe_before_space = {
            t[i - 1] for t in vocab.texts for i in range(1, len(t)) if t[i] == SPACE
        }
        self._cache = {}

    def encode(self, text):
        ids = []
        for piece in self._pieces(text):
            ids.extend(self._encode_piece(piece))
        return ids

    def _pieces(self, text):
        """`text` cut before U+2581 where no token can span the cut."""
        start = 0
        pos = text.find(SPACE, 1)
        while pos > 0:
            if text[pos - 1] not in self._unsafe_before_space:
                yield text[start:pos]
                start = pos
            pos = text.find(SPACE, pos + 1)
        if start < len(text):
            yield text[start:]

    def _encode_piece(self, piece):
        ids = self._cache.get(piece)
        if ids is None:
            ids = [i for sym in merge_pairs(piece, self._priority) for i in self._symbol_ids(sym)]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def _priority(self, left, right):
        """Merge key of a pair: minus the score of the token it forms, None if none."""
        tid = self.token_to_id.get(left + right)
        return None if tid is None else -self.scores[tid]

    def _symbol_ids(self, sym):
        tid = self.token_to_id.get(sym)
        if tid is not None:
            return (tid,)
        out = []
        for b in sym.encode("utf-8", "surrogatepass"):
            if self._byte_ids[b] is None:
                raise FormatError(f"SPM vocab has no byte token <0x{b:02X}> for {sym!r}")
            out.append(self._byte_ids[b])
        return out


def _byte_token(token_to_id, b):
    """llama.cpp's `byte_to_token`: `<0xXX>`, else the byte itself as a token."""
    tid = token_to_id.get(f"<0x{b:02X}>")
    if tid is None and b < 0x80:
        tid = token_to_id.get(chr(b))
    return tid
