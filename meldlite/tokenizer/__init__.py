"""Tokenizer of GGUF vocabularies (SPM and byte-level BPE), token for token
identical to llama.cpp.

    tok = Tokenizer.from_metadata(read_gguf(path).metadata)
    ids = tok.encode("Once upon a time", add_bos=True, parse_special=False)
    text = tok.decode(ids)
    stream = StreamDecoder(tok); text = "".join(stream.push(i) for i in ids) + stream.flush()

Modules: vocab (metadata -> tables), special (special-token split), spm, bpe,
merge (the shared pair-merge loop), pretokenize (BPE word splitting, GPT-2 byte
map), unicode_data (generated class tables), detokenize (pieces, text).
"""

from meldlite.tokenizer.detokenize import StreamDecoder
from meldlite.tokenizer.tokenizer import Tokenizer
from meldlite.tokenizer.vocab import TokenAttr

__all__ = ["StreamDecoder", "TokenAttr", "Tokenizer"]
