"""Routing profiles: `meldlite profile MODEL TEXTFILE -o PROFILE`.

A profile records how a model routes a text: per layer, each expert's
popularity and router-weight mass, co-activation within a token and from one
layer to the next, how often a token's experts were already used by the
previous few tokens (route recurrence: what any cache can hope to gain), how
well layer L's hidden state predicts layer L+1's experts (what prefetch can
gain), the distribution of the renormalised router weights (for adaptive
top-k), and per-expert input statistics (mean squared input per channel, the
"importance matrix" an activation-aware per-expert quantizer needs).

Beside the summary it keeps calibration data: per MoE layer a bounded uniform
sample (reservoir) of the experts' input rows (after ffn_norm) with their routing
ids and weights, from which `meldlite quantize` measures each expert's
sensitivity to quantization.

The file format (JSON plus a calibration sidecar) and its readers are in
meldlite/formats/profile.py.
"""

import time
from pathlib import Path

import numpy as np

from meldlite.errors import OptionError
from meldlite.experts.prefetch import RoutePredictor
from meldlite.formats.profile import FORMAT, VERSION, Profile, encode_array

CALIB_ROWS = 4096  # default calibration sample, rows per layer ...
CALIB_MAX_BYTES = 256 * 2**20  # ... fewer if all layers' rows would exceed this
WINDOWS = (1, 2, 4, 8)  # route recurrence: look back this many tokens
LIGHT = (0.02, 0.05, 0.1, 0.15, 0.2)  # adaptive top-k thresholds reported


def default_calib_rows(cfg):
    """CALIB_ROWS, or fewer so that all layers' float16 rows fit CALIB_MAX_BYTES."""
    per_row = 2 * cfg.n_embd * cfg.n_layer
    return int(max(64, min(CALIB_ROWS, CALIB_MAX_BYTES // per_row)))


class _Reservoir:
    """A uniform sample of at most `cap` rows of a stream (Algorithm R). Every layer
    gets its own with the same seed: the layers see batches of the same sizes, so
    they keep the same tokens."""

    def __init__(self, cap, n_embd, k, seed=0):
        self.cap, self.seen = cap, 0
        self.rng = np.random.default_rng(seed)
        self.x = np.zeros((cap, n_embd), np.float16)  # (cap, E)
        self.ids = np.full((cap, k), -1, np.int16)  # (cap, k)
        self.w = np.zeros((cap, k), np.float32)  # (cap, k)

    def add(self, x, ids, w):
        T = len(x)
        pos = self.seen + np.arange(T)  # (T,) stream index
        slot = np.where(pos < self.cap, pos, self.rng.integers(0, pos + 1))  # (T,)
        keep = slot < self.cap
        for dst, src in ((self.x, x), (self.ids, ids), (self.w, w)):
            dst[slot[keep]] = src[keep]
        self.seen += T

    def arrays(self):
        n = min(self.seen, self.cap)
        return self.x[:n], self.ids[:n], self.w[:n]


class _Recorder:
    """A route observer (`Model.route_observers`): records each MoE layer's routing."""

    def __init__(self, cfg, weights, calib_rows=0):
        self.cfg = cfg
        self.predictor = RoutePredictor(weights, cfg)
        L, X, E = cfg.n_layer, cfg.n_expert, cfg.n_embd
        self.ids = [[] for _ in range(L)]  # per layer: [(T, k) int16]
        self.weights = [[] for _ in range(L)]  # per layer: [(T, k) float32]
        self.pred = [[] for _ in range(L)]  # per layer: [(T, k) predicted]
        self.sq = np.zeros((L, X, E), np.float64)  # (L, X, E) sum of x^2 per expert
        k = max(cfg.n_expert_used, 1)
        self.sample = [_Reservoir(calib_rows, E, k) for _ in range(L)] if calib_rows else None

    def __call__(self, layer, x, ids, weights):
        """x (T, E) the experts' input, ids (T, k) and weights (T, k) as routed."""
        ids = np.asarray(ids)
        self.ids[layer].append(ids.astype(np.int16))
        self.weights[layer].append(np.asarray(weights, np.float32))
        sel = np.zeros((len(ids), self.cfg.n_expert), np.float64)  # (T, X)
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        ok = ids.reshape(-1) >= 0
        sel[rows[ok], ids.reshape(-1)[ok]] = 1.0
        self.sq[layer] += sel.T @ (x.astype(np.float64) ** 2)
        if self.sample:
            self.sample[layer].add(x, ids, weights)
        if layer + 1 < self.cfg.n_layer and self.predictor.routers[layer + 1] is not None:
            z = np.ascontiguousarray(x * self.predictor.ratio(layer, layer + 1), np.float32)
            logits = self.predictor.routers[layer + 1] @ z  # (T, X)
            k = self.cfg.n_expert_used
            self.pred[layer + 1].append(np.argsort(-logits, axis=-1, kind="stable")[:, :k])

    def end_document(self):
        """Mark a document boundary (recurrence does not look across it)."""
        for lst in (self.ids, self.weights, self.pred):
            for per_layer in lst:
                per_layer.append(None)


def _split_docs(seq):
    docs, cur = [], []
    for a in seq:
        if a is None:
            if cur:
                docs.append(np.concatenate(cur))
            cur = []
        else:
            cur.append(a)
    if cur:
        docs.append(np.concatenate(cur))
    return docs


def _layer_docs(seq, k):
    """One layer's per-document arrays; a single (0, k) array for a layer that never
    routed (a dense layer of a MoE model)."""
    return _split_docs(seq) or [np.zeros((0, k), np.int64)]


def _mean(a, shape):
    """Mean over the first axis, zeros of `shape` when there are no rows."""
    return np.asarray(a).mean(axis=0) if len(a) else np.zeros(shape)


def recurrence(docs, n_expert, window):
    """Fraction of (token, expert) picks whose expert was also picked by one of
    the previous `window` tokens of the same document (first tokens excluded)."""
    hit = total = 0
    for ids in docs:
        T = len(ids)
        if T <= 1:
            continue
        onehot = np.zeros((T, n_expert), bool)  # (T, X)
        for j in range(ids.shape[1]):
            ok = ids[:, j] >= 0
            onehot[np.flatnonzero(ok), ids[ok, j]] = True
        seen = np.zeros((T, n_expert), bool)  # used in the window before t
        for w in range(1, window + 1):
            seen[w:] |= onehot[:-w]
        hit += int((onehot[1:] & seen[1:]).sum())
        total += int(onehot[1:].sum())
    return hit / total if total else 0.0


def build_profile(
    model,
    text,
    separator="<|endoftext|>",
    max_tokens=None,
    text_name=None,
    progress=None,
    calib_rows=None,
):
    """Run `model` over `text` (each document alone, as BOS + document, in
    windows of the context) and return the profile (a dict, `Profile`).

    calib_rows: rows per layer of the calibration sample (None: `default_calib_rows`,
    0: none)."""
    cfg = model.cfg
    if not cfg.is_moe:
        raise OptionError("profile needs a Mixture-of-Experts model; this one has no experts")
    docs = [d.strip("\n") for d in text.split(separator)] if separator else [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise OptionError("profile needs some text")
    if calib_rows is None:
        calib_rows = default_calib_rows(cfg)
    if calib_rows < 0:
        raise OptionError(f"calib_rows must be >= 0, got {calib_rows}")
    rec = _Recorder(cfg, model.weights, calib_rows)
    model.route_observers.append(rec)
    n_tok, n_docs, t0 = 0, 0, time.perf_counter()
    try:
        for doc in docs:
            ids = model.tokenize(doc, add_bos=True)
            for start in range(0, len(ids), model.n_ctx):
                window = ids[start : start + model.n_ctx]
                model.logits(window)
                rec.end_document()
                n_tok += len(window)
            n_docs += 1
            if progress:
                progress(n_docs, n_tok)
            if max_tokens and n_tok >= max_tokens:
                break
    finally:
        model.route_observers.remove(rec)
    return summarize(rec, cfg, model, n_tok, n_docs, text_name, separator, time.perf_counter() - t0)


def summarize(rec, cfg, model, n_tok, n_docs, text_name, separator, seconds):
    L, X, k = cfg.n_layer, cfg.n_expert, cfg.n_expert_used
    layers = []
    for layer in range(L):
        docs = _layer_docs(rec.ids[layer], k)
        ids = np.concatenate(docs).astype(np.int64)  # (N, k); N = 0 for a dense layer
        w = np.concatenate(_layer_docs(rec.weights[layer], k)).astype(np.float32)  # (N, k)
        valid = ids >= 0
        counts = np.bincount(ids[valid], minlength=X)  # (X,)
        share = counts / max(1, counts.sum())
        rel = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)  # renormalised
        mass = np.bincount(ids[valid], weights=rel[valid], minlength=X) / max(1, len(ids))
        onehot = np.zeros((len(ids), X), np.int64)  # (N, X)
        for j in range(k):
            ok = valid[:, j]
            onehot[np.flatnonzero(ok), ids[ok, j]] = 1
        co = onehot.T @ onehot  # (X, X)
        entry = {
            "layer": layer,
            "tokens": len(ids),
            "counts": counts.tolist(),
            "share": [round(float(s), 6) for s in share],
            "weight_mass": [round(float(m), 6) for m in mass],
            "entropy": float(-(share[share > 0] * np.log(share[share > 0])).sum()),
            "coactivation": co.tolist(),
            "recurrence": {str(wn): round(recurrence(docs, X, wn), 6) for wn in WINDOWS},
            "slot_weight_mean": [round(float(v), 6) for v in _mean(rel, k)],
            "light_fraction": {str(t): round(float(_mean(rel[valid] < t, ())), 6) for t in LIGHT},
            "input_sq_mean": encode_array(rec.sq[layer] / np.maximum(counts, 1)[:, None]),
        }
        entry["entropy_ratio"] = entry["entropy"] / np.log(X)
        if layer + 1 < L:
            nxt = np.concatenate(_layer_docs(rec.ids[layer + 1], k)).astype(np.int64)
            nxt_hot = np.zeros((len(nxt), X), np.int64)
            for j in range(k):
                ok = nxt[:, j] >= 0
                nxt_hot[np.flatnonzero(ok), nxt[ok, j]] = 1
            same = len(nxt_hot) == len(onehot)  # not across a dense layer (no rows)
            co_next = onehot.T @ nxt_hot if same else np.zeros((X, X), np.int64)  # (X, X)
            entry["next_layer_coactivation"] = co_next.tolist()
        if layer > 0:
            pred = np.concatenate(_layer_docs(rec.pred[layer], k)).astype(np.int64)
            if len(pred) != len(ids):  # the layer before routes nothing (dense): no guesses
                pred = np.full((len(ids), k), -1, np.int64)  # (N, k)
            overlap = np.array([len(np.intersect1d(p, a[a >= 0])) for p, a in zip(pred, ids)])
            exact = overlap == valid.sum(axis=1)
            entry["prediction"] = {
                "overlap": round(float(_mean(overlap, ()) / k), 6),
                "exact": round(float(_mean(exact, ())), 6),
            }
        layers.append(entry)
    path = Path(model.path)
    prof = Profile(
        {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "file": path.name,
                "file_size": path.stat().st_size,
                "architecture": cfg.arch,
                "n_layer": L,
                "n_expert": X,
                "n_expert_used": k,
                "n_embd": cfg.n_embd,
                "n_ff_exp": cfg.n_ff_exp,
            },
            "text": {
                "file": text_name,
                "separator": separator,
                "documents": n_docs,
                "tokens": n_tok,
                "seconds": round(seconds, 3),
            },
            "windows": list(WINDOWS),
            "layers": layers,
            "summary": {
                "recurrence": {
                    str(wn): round(
                        float(np.mean([lay["recurrence"][str(wn)] for lay in layers])), 6
                    )
                    for wn in WINDOWS
                },
                "prediction_overlap": (
                    round(float(np.mean([lay["prediction"]["overlap"] for lay in layers[1:]])), 6)
                    if L > 1
                    else None
                ),
                "entropy_ratio": round(float(np.mean([lay["entropy_ratio"] for lay in layers])), 6),
            },
        }
    )
    if rec.sample:
        prof.calibration = [r.arrays() for r in rec.sample]
        prof["calibration"] = {
            "file": None,
            "rows": [len(a[0]) for a in prof.calibration],
            "dtype": "float16",
            "seen": n_tok,
        }
    return prof
