"""Split text at special-token texts before tokenizing (llama.cpp's
`tokenizer_st_partition`).

Special tokens (CONTROL, USER_DEFINED, UNKNOWN) are tried longest first; each
one cuts every remaining text fragment at all of its occurrences.  With
`parse_special=False` only USER_DEFINED tokens cut.  LSTRIP/RSTRIP tokens
swallow the white space (C `isspace`) next to them.
"""

from meldlite.tokenizer.vocab import TokenAttr

_C_SPACE = " \t\n\v\f\r"
_SKIP_UNPARSED = TokenAttr.CONTROL | TokenAttr.UNKNOWN


def partition(text, vocab, parse_special):
    """`text` as a list of fragments: str (raw text, never empty) or int (a token id)."""
    fragments = [text] if text else []
    for tid in vocab.special_ids:
        attr = vocab.attrs[tid]
        if not parse_special and attr & _SKIP_UNPARSED:
            continue
        needle = vocab.texts[tid]
        if any(isinstance(f, str) and needle in f for f in fragments):
            fragments = _cut_all(fragments, tid, needle, attr)
    return fragments


def _cut_all(fragments, tid, needle, attr):
    out = []
    for frag in fragments:
        if isinstance(frag, str) and needle in frag:
            out.extend(_cut(frag, tid, needle, attr))
        else:
            out.append(frag)
    return out


def _cut(text, tid, needle, attr):
    """One raw fragment cut at every occurrence of `needle`."""
    out, pos = [], 0
    while True:
        match = text.find(needle, pos)
        if match < 0:
            break
        left = text[pos:match]
        if attr & TokenAttr.LSTRIP:
            left = left.rstrip(_C_SPACE)
        if left:
            out.append(left)
        out.append(tid)
        pos = match + len(needle)
        if attr & TokenAttr.RSTRIP:
            while pos < len(text) and text[pos] in _C_SPACE:
                pos += 1
    if pos < len(text):
        out.append(text[pos:])
    return out
