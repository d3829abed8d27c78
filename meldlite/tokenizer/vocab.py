"""The vocabulary of a GGUF file, read and fixed up the way llama.cpp's
`llama_vocab::impl::load` does: token texts, scores, attributes, special ids,
add-BOS/EOS flags, end-of-generation set and the special-token list used to
split text before tokenizing.
"""

import enum
import numbers

from gguf import Keys, TokenType

from meldlite.errors import FormatError, UnsupportedError
from meldlite.tokenizer.pretokenize import PRE_TYPES, PreType

K = Keys.Tokenizer
SPM, BPE = "llama", "gpt2"  # tokenizer.ggml.model values meldlite reads
SUPPORTED_MODELS = (SPM, BPE)


class TokenAttr(enum.IntFlag):
    """llama.cpp's `llama_token_attr` bits."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


_TYPE_TO_ATTR = {
    TokenType.NORMAL: TokenAttr.NORMAL,
    TokenType.UNKNOWN: TokenAttr.UNKNOWN,
    TokenType.CONTROL: TokenAttr.CONTROL,
    TokenType.USER_DEFINED: TokenAttr.USER_DEFINED,
    TokenType.UNUSED: TokenAttr.UNUSED,
    TokenType.BYTE: TokenAttr.BYTE,
}
_TYPE_TO_INT = {int(t): int(a) for t, a in _TYPE_TO_ATTR.items()}
SPECIAL_ATTRS = TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN

# Token texts llama.cpp recognises when the metadata does not name the id
# (`load`, "auto-detect special tokens by text").
EOT_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    K.FIM_PRE_ID: (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    K.FIM_SUF_ID: (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    K.FIM_MID_ID: (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    K.FIM_PAD_ID: ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    K.FIM_REP_ID: ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    K.FIM_SEP_ID: ("<|file_sep|>",),
}
EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    )
)
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# Ids read from metadata; deprecated prefix/suffix/middle keys alias the FIM ones.
_ID_KEYS = {
    "bos": K.BOS_ID,
    "eos": K.EOS_ID,
    "eot": K.EOT_ID,
    "eom": K.EOM_ID,
    "unk": K.UNK_ID,
    "sep": K.SEP_ID,
    "pad": K.PAD_ID,
    "mask": K.MASK_ID,
    "fim_pre": K.FIM_PRE_ID,
    "fim_suf": K.FIM_SUF_ID,
    "fim_mid": K.FIM_MID_ID,
    "fim_pad": K.FIM_PAD_ID,
    "fim_rep": K.FIM_REP_ID,
    "fim_sep": K.FIM_SEP_ID,
}
_DEPRECATED_ID_KEYS = {"fim_pre": K.PREFIX_ID, "fim_suf": K.SUFFIX_ID, "fim_mid": K.MIDDLE_ID}
_FIM_NAMES = {
    K.FIM_PRE_ID: "fim_pre",
    K.FIM_SUF_ID: "fim_suf",
    K.FIM_MID_ID: "fim_mid",
    K.FIM_PAD_ID: "fim_pad",
    K.FIM_REP_ID: "fim_rep",
    K.FIM_SEP_ID: "fim_sep",
}
_DEFAULT_IDS = {SPM: {"bos": 1, "eos": 2, "unk": 0}, BPE: {"bos": 11, "eos": 11}}


class Vocab:
    """Token tables and flags; built by `Vocab.from_metadata`, read-only afterwards.

    texts[i]: str, scores[i]: float, attrs[i]: int (TokenAttr bits);
    ids: dict name -> token id or None (bos, eos, eot, eom, unk, sep, pad, mask, fim_*).
    """

    def __init__(self, model, texts, scores, attrs, pre_type, merges):
        self.model = model  # SPM or BPE
        self.texts = texts
        self.scores = scores
        self.attrs = attrs
        self.token_to_id = {t: i for i, t in enumerate(texts)}
        self.pre_type = pre_type  # PreType (BPE) or None (SPM)
        self.merges = merges  # MergeRanks: .get((left, right)) -> rank (BPE), or None
        self.ids = {}
        self.add_bos = self.add_eos = self.add_space_prefix = False
        self.clean_spaces = False
        self.eog_ids = frozenset()
        self.special_ids = ()  # CONTROL/USER_DEFINED/UNKNOWN, longest text first

    @property
    def n_tokens(self):
        return len(self.texts)

    @classmethod
    def from_metadata(cls, md):
        model = _tokenizer_model(md)
        texts = _token_texts(md)
        n = len(texts)
        pre_type = _pre_type(md) if model == BPE else None
        vocab = cls(
            model,
            texts,
            _scores(md, n),
            _attrs(md, n),
            pre_type,
            _merge_ranks(md) if model == BPE else None,
        )
        vocab._read_flags(md)
        vocab._read_ids(md)
        vocab._detect_special_tokens()
        vocab._collect_eog()
        vocab.special_ids = _special_order(vocab)
        _apply_name_rules(vocab, md)
        return vocab

    # -- flags and ids ---------------------------------------------------------

    def _read_flags(self, md):
        spm = self.model == SPM
        self.add_space_prefix = _flag(md, K.ADD_PREFIX, spm)
        self.add_bos = _flag(md, K.ADD_BOS, spm or self.pre_type.add_bos)
        self.add_eos = _flag(md, K.ADD_EOS, False)
        self.clean_spaces = (not spm) and self.pre_type.clean_spaces

    def _read_ids(self, md):
        defaults = dict(_DEFAULT_IDS[self.model])
        if self.pre_type is not None and not self.pre_type.has_bos:
            defaults.pop("bos")
        for name, key in _ID_KEYS.items():
            tid = defaults.get(name)
            if tid is not None and tid >= self.n_tokens:
                tid = None
            for k in (key, _DEPRECATED_ID_KEYS.get(name)):
                value = _int(md, k) if k else None
                if value is not None and 0 <= value < self.n_tokens:
                    tid = value
            self.ids[name] = tid

    def _first_with_text(self, candidates):
        found = [self.token_to_id[t] for t in candidates if t in self.token_to_id]
        return min(found) if found else None

    def _mark_control(self, tid):
        self.attrs[tid] |= TokenAttr.CONTROL

    def _detect_special_tokens(self):
        """EOT, EOM and FIM ids found by text when the metadata does not give them."""
        for name, texts in [("eot", EOT_TEXTS), ("eom", EOM_TEXTS)] + [
            (_FIM_NAMES[k], v) for k, v in FIM_TEXTS.items()
        ]:
            if self.ids[name] is None:
                self.ids[name] = self._first_with_text(texts)
                if self.ids[name] is not None:
                    self._mark_control(self.ids[name])

    def _collect_eog(self):
        eog = {self.ids[n] for n in ("fim_pad", "fim_rep", "fim_sep") if self.ids[n] is not None}
        for text in EOG_TEXTS:
            tid = self.token_to_id.get(text)
            if tid is not None:
                eog.add(tid)
                self._mark_control(tid)
        for text in ALWAYS_RENDERED:
            if text in self.token_to_id:
                self.attrs[self.token_to_id[text]] = int(TokenAttr.USER_DEFINED)
        eog |= {self.ids[n] for n in ("eos", "eot", "eom") if self.ids[n] is not None}
        self.eog_ids = frozenset(self._drop_false_eog(eog))

    def _drop_false_eog(self, eog):
        """llama.cpp's workarounds: `<|end|>` is not EOG next to `<|return|>`+`<|call|>`
        (or `<|calls|>`+`<|flush|>`); `</s>` is a normal token next to `<|tool_response>`."""
        texts = {self.texts[t]: t for t in eog}
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])
            self.attrs[texts["<|end|>"]] = int(TokenAttr.USER_DEFINED)
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self.attrs[texts["</s>"]] = int(TokenAttr.NORMAL)
        return eog


# -- metadata readers ------------------------------------------------------------


def _tokenizer_model(md):
    model = md.get(K.MODEL)
    if model is None:
        raise FormatError(f"metadata {K.MODEL!r} is missing")
    if not isinstance(model, str):
        raise FormatError(f"metadata {K.MODEL!r} is not a string: {model!r}")
    if model not in SUPPORTED_MODELS:
        raise UnsupportedError(
            f"tokenizer model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    return model


def _pre_type(md):
    pre = md.get(K.PRE) or "default"
    if not isinstance(pre, str):
        raise FormatError(f"metadata {K.PRE!r} is not a string: {pre!r}")
    if pre not in PRE_TYPES:
        raise UnsupportedError(
            f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TYPES))})"
        )
    return PRE_TYPES[pre]


def _list(md, key, n=None, item_types=None):
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise FormatError(f"metadata {key!r} is not an array")
    if n is not None and len(value) != n:
        raise FormatError(f"metadata {key!r} has {len(value)} entries for {n} tokens")
    if item_types and not all(issubclass(t, item_types) for t in set(map(type, value))):
        raise FormatError(f"metadata {key!r} has entries of the wrong type")
    return value


def _token_texts(md):
    texts = _list(md, K.LIST, item_types=str)
    if texts is None:
        raise FormatError(f"metadata {K.LIST!r} (the token list) is missing")
    if not texts:
        raise FormatError(f"metadata {K.LIST!r} is empty")
    texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(texts)]
    if len(set(texts)) != len(texts):
        raise FormatError(f"metadata {K.LIST!r} has duplicate token texts")
    return texts


def _scores(md, n):
    scores = _list(md, K.SCORES, n, numbers.Real)
    return [0.0] * n if scores is None else [float(s) for s in scores]


def _attrs(md, n):
    types = _list(md, K.TOKEN_TYPE, n, numbers.Integral)
    if types is None:
        return [int(TokenAttr.NORMAL)] * n
    return [_TYPE_TO_INT.get(t, 0) for t in types]  # 0: UNDEFINED


def _merge_ranks(md):
    merges = _list(md, K.MERGES, item_types=str)
    if merges is None:
        raise FormatError(f"metadata {K.MERGES!r} is missing (needed by a BPE vocab)")
    return MergeRanks(merges)


class MergeRanks:
    """(left, right) -> rank of the merge "left right", as llama.cpp's `bpe_ranks`: each
    merge string split at its first space after the first character, the first rank of
    a pair kept. Keyed by the metadata's own strings: a table of (left, right) tuples
    would hold a tuple and two new strings per merge (69 MiB for llama-3's 280k merges,
    against 12 MiB here; docs/speed.md "Fixed memory")."""

    def __init__(self, merges):
        self._ranks = {}
        for rank, merge in enumerate(merges):
            self._ranks.setdefault(merge, rank)

    def get(self, pair):
        """The rank of the pair (left, right), or None."""
        left, right = pair
        if " " in left[1:]:  # llama.cpp splits "left right" at an earlier space
            return None
        return self._ranks.get(f"{left} {right}")


def _flag(md, key, default):
    value = md.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, numbers.Integral)):
        raise FormatError(f"metadata {key!r} is not a boolean: {value!r}")
    return bool(value)


def _int(md, key):
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FormatError(f"metadata {key!r} is not an integer: {value!r}")
    return int(value)


def _special_order(vocab):
    """Ids that split text before tokenizing, longest UTF-8 text first."""
    special = int(SPECIAL_ATTRS)
    ids = [i for i, a in enumerate(vocab.attrs) if a & special]
    return tuple(sorted(ids, key=lambda i: -len(vocab.texts[i].encode("utf-8", "surrogatepass"))))


def _set_attr(vocab, text, bit, on):
    tid = vocab.token_to_id.get(text)
    if tid is not None:
        vocab.attrs[tid] = (vocab.attrs[tid] | bit) if on else (vocab.attrs[tid] & ~bit)


def _apply_name_rules(vocab, md):
    """Per-model LSTRIP/RSTRIP attributes llama.cpp sets by model or tokenizer name."""
    name = str(md.get(Keys.General.NAME) or "").lower()
    pre = str(md.get(K.PRE) or "")
    arch = str(md.get(Keys.General.ARCHITECTURE) or "")
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        _set_attr(vocab, "<mask>", TokenAttr.LSTRIP, True)
    elif "phi-3" in name or "phi3" in name:
        for tid in vocab.special_ids:
            vocab.attrs[tid] |= TokenAttr.RSTRIP
        _set_attr(vocab, "</s>", TokenAttr.RSTRIP, True)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            _set_attr(vocab, text, TokenAttr.RSTRIP, False)
    elif "modern-bert" in name:
        _set_attr(vocab, "[MASK]", TokenAttr.LSTRIP, True)


__all__ = ["BPE", "SPM", "SUPPORTED_MODELS", "PreType", "TokenAttr", "Vocab"]
