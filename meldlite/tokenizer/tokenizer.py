"""`Tokenizer`: text <-> token ids for a GGUF vocabulary, identical to llama.cpp's
`llama_tokenize` / `llama_detokenize` / `llama_token_to_piece`."""

from meldlite.errors import FormatError, OptionError
from meldlite.tokenizer.bpe import BpeEncoder
from meldlite.tokenizer.detokenize import detokenize, piece_table, token_piece
from meldlite.tokenizer.special import partition
from meldlite.tokenizer.spm import SPACE, SpmEncoder
from meldlite.tokenizer.vocab import SPM, Vocab


class Tokenizer:
    """Built from GGUF metadata with `Tokenizer.from_metadata(metadata)`."""

    def __init__(self, vocab):
        self.vocab = vocab
        self._encoder = SpmEncoder(vocab) if vocab.model == SPM else BpeEncoder(vocab)
        self._pieces = piece_table(vocab)

    @classmethod
    def from_metadata(cls, metadata):
        """metadata: GGUF key -> plain value (str, int, float, bool, list).

        Raises UnsupportedError for a tokenizer model or pre-tokenizer meldlite
        does not implement, FormatError for malformed vocabulary metadata.
        """
        return cls(Vocab.from_metadata(metadata))

    # -- properties ------------------------------------------------------------

    @property
    def n_vocab(self):
        return self.vocab.n_tokens

    @property
    def bos_id(self):
        """BOS token id, or None."""
        return self.vocab.ids["bos"]

    @property
    def eos_id(self):
        """EOS token id, or None."""
        return self.vocab.ids["eos"]

    @property
    def eot_id(self):
        """End-of-turn token id (from metadata or found by text), or None."""
        return self.vocab.ids["eot"]

    @property
    def eog_ids(self):
        """All end-of-generation token ids (frozenset)."""
        return self.vocab.eog_ids

    @property
    def add_bos(self):
        """Whether encode(add_bos=True) prepends BOS (tokenizer.ggml.add_bos_token)."""
        return self.vocab.add_bos

    @property
    def add_eos(self):
        """Whether encode(add_bos=True) appends EOS (tokenizer.ggml.add_eos_token)."""
        return self.vocab.add_eos

    def is_eog(self, tid):
        """True for end-of-generation tokens: EOS, EOT, EOM and the ones llama.cpp
        recognises by text (`<|im_end|>`, `<|endoftext|>`, ...)."""
        return tid in self.vocab.eog_ids

    # -- encoding ----------------------------------------------------------------

    def encode(self, text, add_bos=True, parse_special=False):
        """Token ids of `text`, as llama.cpp's `llama_tokenize(add_special=add_bos,
        parse_special=parse_special)`.

        add_bos: add the vocab's special tokens (BOS if add_bos_token, EOS if
        add_eos_token). parse_special: turn CONTROL token texts such as `<s>`
        into their ids (USER_DEFINED texts are always turned into ids).
        """
        if not isinstance(text, str):
            raise OptionError(f"encode() needs str, not {type(text).__name__}")
        ids = self._begin(add_bos)
        fragments = partition(text, self.vocab, parse_special)
        if self.vocab.model == SPM:
            self._encode_spm(fragments, ids)
        else:
            self._encode_bpe(fragments, ids)
        if add_bos and self.vocab.add_eos:
            ids.append(self._required("eos"))
        return ids

    def _begin(self, add_special):
        return [self._required("bos")] if add_special and self.vocab.add_bos else []

    def _required(self, name):
        tid = self.vocab.ids[name]
        if tid is None:
            raise FormatError(f"the vocab asks for a {name.upper()} token but has none")
        return tid

    def _encode_spm(self, fragments, ids):
        prev_special = True  # the space prefix goes first and after each special token
        for frag in fragments:
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            if self.vocab.add_space_prefix and prev_special:
                frag = " " + frag
            ids.extend(self._encoder.encode(frag.replace(" ", SPACE)))
            prev_special = False

    def _encode_bpe(self, fragments, ids):
        for frag in fragments:
            if isinstance(frag, int):
                ids.append(frag)
            else:
                ids.extend(self._encoder.encode(frag))

    # -- decoding ----------------------------------------------------------------

    def _check_id(self, tid):
        if not 0 <= tid < self.n_vocab:
            raise OptionError(f"token id {tid} is out of range (vocab has {self.n_vocab})")

    def token_to_piece(self, tid, special=False):
        """Bytes of one token (may be part of a UTF-8 character), as llama.cpp's
        `llama_token_to_piece(lstrip=0, special=special)`: CONTROL/UNKNOWN tokens
        give b"" unless `special`."""
        self._check_id(tid)
        return token_piece(self.vocab, self._pieces, tid, special)

    def decode_bytes(self, ids, special=False, remove_special=False):
        """llama.cpp's `llama_detokenize(remove_special, unparse_special=special)`."""
        ids = list(ids)
        for tid in ids:
            self._check_id(tid)
        return detokenize(self.vocab, self._pieces, ids, remove_special, special)

    def decode(self, ids, special=False, remove_special=False):
        """Text of `ids` (see decode_bytes); invalid UTF-8 becomes U+FFFD.

        For an SPM vocab with add_space_prefix the leading space of the first
        token is dropped (so decode(encode(t, add_bos=False)) == t); when the
        ids start with BOS the space after it is kept (also with remove_special,
        which drops the BOS itself), as in llama.cpp.
        """
        return self.decode_bytes(ids, special, remove_special).decode("utf-8", "replace")
