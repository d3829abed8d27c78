"""Token ids back to bytes and text (llama.cpp's `token_to_piece` and `detokenize`).

A token's piece is its text for CONTROL/UNKNOWN/USER_DEFINED tokens (CONTROL and
UNKNOWN only when `special` is asked for), the text with U+2581 turned back into
spaces (SPM) or with GPT-2 stand-in characters turned back into bytes (BPE) for
NORMAL tokens, the byte of a `<0xXX>` BYTE token, and nothing for the rest.
"""

import codecs

from meldlite.tokenizer.pretokenize import UNICODE_TO_BYTE
from meldlite.tokenizer.spm import SPACE
from meldlite.tokenizer.vocab import SPM, TokenAttr

# plain ints: IntFlag arithmetic is ~10x slower and the table is built for every token
_SPECIAL = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)
_RAW = _SPECIAL | int(TokenAttr.USER_DEFINED)
_NORMAL, _BYTE = int(TokenAttr.NORMAL), int(TokenAttr.BYTE)


def piece_table(vocab):
    """Every token's piece (bytes) as llama.cpp caches it (special=True)."""
    decode = _spm_normal if vocab.model == SPM else _gpt2_normal
    return [_piece(text, attr, decode) for text, attr in zip(vocab.texts, vocab.attrs)]


def _utf8(text):
    return text.encode("utf-8", "surrogatepass")


def _piece(text, attr, decode_normal):
    if attr & _RAW:
        return _utf8(text)
    if attr & _NORMAL:
        return decode_normal(text)
    if attr & _BYTE:
        return bytes([_hex_byte(text[3:5])])
    return b""


def _spm_normal(text):
    return _utf8(text.replace(SPACE, " "))


def _gpt2_normal(text):
    """GPT-2 stand-in characters to bytes; an unknown character becomes a marker
    `[UNK_BYTE_0x<utf-8 hex><token text>]` as in llama.cpp's `llama_decode_text`."""
    if not text.translate(_DROP_GPT2):  # every character is a stand-in: the fast path
        return text.translate(_GPT2_TO_LATIN1).encode("latin-1")
    out = bytearray()
    for ch in text:
        b = UNICODE_TO_BYTE.get(ch)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + _utf8(ch).hex().encode() + _utf8(text) + b"]"
    return bytes(out)


_GPT2_TO_LATIN1 = {ord(ch): b for ch, b in UNICODE_TO_BYTE.items()}
_DROP_GPT2 = dict.fromkeys(_GPT2_TO_LATIN1)


def _hex_byte(digits):
    """C `strtol(digits, NULL, 16)` of a BYTE token's two hex digits, as a byte."""
    value = 0
    for ch in digits:
        if ch not in "0123456789abcdefABCDEF":
            break
        value = value * 16 + int(ch, 16)
    return value & 0xFF


def token_piece(vocab, pieces, tid, special):
    if not special and vocab.attrs[tid] & _SPECIAL:
        return b""
    return pieces[tid]


def detokenize(vocab, pieces, ids, remove_special, unparse_special):
    """llama.cpp's `llama_detokenize`: bytes of the concatenated pieces."""
    ids = list(ids)
    remove_space = vocab.add_space_prefix
    if remove_special and vocab.add_bos and ids and ids[0] == vocab.ids["bos"]:
        remove_space = False
        ids = ids[1:]
    if remove_special and vocab.add_eos and ids and ids[-1] == vocab.ids["eos"]:
        ids = ids[:-1]
    out = bytearray()
    for tid in ids:
        piece = token_piece(vocab, pieces, tid, unparse_special)
        if remove_space and piece.startswith(b" "):
            piece = piece[1:]
        remove_space = False
        out += piece
    return clean_spaces(out) if vocab.clean_spaces else bytes(out)


def clean_spaces(text):
    """llama.cpp's `clean_up_tokenization_spaces` passes, byte for byte."""
    return _clean_contractions(_clean_quotes(_clean_punct(bytearray(text))))


def _clean_punct(buf):
    """Drop the space before ? ! . ,"""
    n, total = len(buf), min(len(buf), 1)
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    return buf[:total]


def _clean_quotes(buf):
    """ " ' " -> "'" (both spaces around a lone apostrophe dropped)."""
    n, total, i = len(buf), min(len(buf), 1), 1
    while i < n:
        x = buf[i]
        if x == 0x27 and i + 1 < n and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    return buf[:total]


def _clean_contractions(buf):
    """Drop the space before 's 'm 're 've."""
    n, total = len(buf), min(len(buf), 1)
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = buf[i + 1]
            if x1 in b"sm" or (
                x1 not in b"td" and i + 2 < n and bytes(buf[i + 1 : i + 3]) in (b"re", b"ve")
            ):
                total -= 1
        buf[total] = x
        total += 1
    return bytes(buf[:total])


class StreamDecoder:
    """Text of a token stream as it completes: pieces may end inside a UTF-8
    character, which is held back until the next piece completes it.

    `push(id) -> str` (possibly ""), `flush() -> str` (the rest; incomplete bytes
    become U+FFFD). Pieces are concatenated as they are (no leading-space strip,
    no clean-up), like llama.cpp's streaming `token_to_piece` output.
    """

    def __init__(self, tokenizer, special=False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tid):
        return self._utf8.decode(self.tokenizer.token_to_piece(tid, special=self.special))

    def flush(self):
        return self._utf8.decode(b"", final=True)
