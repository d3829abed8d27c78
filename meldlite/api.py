"""The public Python API: `meldlite.load(...) -> Model`."""

import codecs
import math
import os
import resource
import time

import numpy as np

from meldlite import sampling
from meldlite.config import ModelConfig
from meldlite.data import default_model_path
from meldlite.errors import OptionError
from meldlite.experts import make_store
from meldlite.experts.io import drop_file_cache
from meldlite.formats import read_gguf
from meldlite.kernels.threads import set_threads
from meldlite.metrics import log_softmax
from meldlite.model import KVCache, check_weights, forward
from meldlite.tokenizer import Tokenizer
from meldlite.weights import Weights


def load(
    path=None,
    *,
    n_ctx=None,
    n_threads=None,
    n_batch=512,
    llama_numerics=True,
    mem_budget=None,
    cache_policy=None,
    prefetch=True,
    min_expert_weight=None,
    io_throttle=None,
    cold=False,
    profile=None,
    expert_io=None,
    peers=None,
    placement=None,
    wire="f32",
    exact=False,
    fuse=0.0,
    link=None,
    keys=None,
    insecure=False,
    peer_timeout=10.0,
):
    """Open a GGUF model (`None`: the built-in default model).

    n_ctx: context length (default: the model's training context, at most 4096);
    n_threads: compute threads (default: all cores); n_batch: prompt tokens per
    forward call during prefill; llama_numerics: round activations before each
    quantized matmul as llama.cpp does (8-bit blocks for quantized weights,
    f16 for F16), which makes logits agree with llama.cpp's; False computes
    with float activations instead.

    Expert offloading (docs/experts.md): mem_budget ("64MB", "1.5GB", "25%" of
    the expert bytes, or bytes) keeps at most that much expert weight in memory,
    reading experts from the file when routed to (None: all experts stay in the
    memory map); cache_policy "forecast" (default), "lfu" or "lru"; prefetch:
    predict the next layer's experts and load them in a background thread;
    profile: a `meldlite profile` JSON whose popularity seeds the policy (without
    one, a file from `meldlite quantize` seeds it with its own expert popularity and
    starts with its most popular experts cached);
    expert_io: "direct" (O_DIRECT reads into slabs, default), "pread" (buffered
    reads into slabs) or "mmap" (the madvise'd memory map).
    min_expert_weight: adaptive top-k, skip routed experts whose renormalised
    router weight is below it (changes results; any store).
    Measurement aids: io_throttle ("200MB/s") emulates slower storage for expert
    reads; cold drops the model file from the page cache before opening it.

    Peers (docs/peers.md): peers ["tcp://host:port", ...] computes routed experts
    on `meldlite peer` processes (the store above then serves local experts and
    failover); placement: a `meldlite place` file (default round-robin); wire
    "f32", "f16" or "q8" hidden states; exact: bit-identical to one node (f32);
    fuse: token-fusion threshold for prefill; keys: CurveZMQ key directory;
    insecure: allow unencrypted non-loopback peers; peer_timeout: seconds per
    request; link ("100Mbit/5ms"): link emulation, a measurement aid.
    """
    return Model(
        default_model_path() if path is None else os.fspath(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_batch=n_batch,
        llama_numerics=llama_numerics,
        cold=cold,
        mem_budget=mem_budget,
        cache_policy=cache_policy,
        prefetch=prefetch,
        min_expert_weight=min_expert_weight,
        io_throttle=io_throttle,
        profile=profile,
        expert_io=expert_io,
        peers=peers,
        peer_options=dict(
            placement=placement,
            wire=wire,
            exact=exact,
            fuse=fuse,
            link=link,
            keys=keys,
            insecure=insecure,
            timeout=peer_timeout,
        ),
    )


def peak_rss_bytes():
    """Peak resident set size of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Model:
    """A loaded model: tokenizer, resident weights, expert store and KV cache."""

    def __init__(
        self,
        path,
        n_ctx=None,
        n_threads=None,
        n_batch=512,
        llama_numerics=True,
        cold=False,
        peers=None,
        peer_options=None,
        **store_options,
    ):
        self.path = path
        self.cold_cache = drop_file_cache(path) if cold else None  # (cached before, after)
        self.gguf = read_gguf(path)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.weights = Weights(self.gguf, llama_numerics)
        self.cfg = ModelConfig.from_metadata(
            self.gguf.metadata, n_vocab=self.weights["token_embd.weight"].shape[0]
        )
        check_weights(self.cfg, self.weights)
        self.n_ctx = self.cfg.n_ctx_train if n_ctx is None else int(n_ctx)
        if n_ctx is None:
            self.n_ctx = min(self.n_ctx, 4096)
        if not 1 <= self.n_ctx <= 1 << 20:
            raise OptionError(f"n_ctx must be in 1..{1 << 20}, got {n_ctx}")
        if int(n_batch) < 1:
            raise OptionError(f"n_batch must be >= 1, got {n_batch}")
        self.n_batch = int(n_batch)
        self.n_threads = set_threads(n_threads)
        if not self.cfg.is_moe and store_options.get("mem_budget") is not None:
            raise OptionError(
                "mem_budget applies to Mixture-of-Experts models; this one has no experts"
            )
        if peers:  # adaptive top-k is applied once, before routing to peers
            peer_options = dict(
                peer_options or {}, min_expert_weight=store_options.pop("min_expert_weight", None)
            )
        self.store = (
            make_store(
                self.gguf, self.cfg, self.weights, llama_numerics=llama_numerics, **store_options
            )
            if self.cfg.is_moe
            else None
        )
        if peers:
            from meldlite.transports.remote import connect

            try:
                connect(self, peers, **peer_options)
            except BaseException:
                if self.store is not None:
                    self.store.close()
                raise
        self.cache = KVCache(self.cfg, self.n_ctx)
        self.timings = {}

    # --- tokens ---
    def tokenize(self, text, add_bos=True):
        """Token ids of `text` (with BOS per the vocabulary's flags when add_bos)."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids):
        """Text of token ids."""
        return self.tokenizer.decode(list(ids))

    # --- logits ---
    def _eval(self, ids, all_logits):
        """Feed ids after what the cache holds, in n_batch chunks."""
        ids = self._check_ids(ids)
        out = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            last = start + self.n_batch >= len(ids)
            logits = forward(
                self.cfg, self.weights, self.store, self.cache, chunk, all_logits=all_logits
            )
            if all_logits or last:
                out.append(logits)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.n_vocab), np.float32)

    def _check_ids(self, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.n_vocab):
            raise OptionError(f"token ids must be in 0..{self.cfg.n_vocab - 1}")
        if self.cache.n_past + ids.size > self.n_ctx:
            raise OptionError(
                f"{self.cache.n_past + ids.size} tokens do not fit the context "
                f"of {self.n_ctx} (load with a larger n_ctx)"
            )
        return ids

    def logits(self, ids):
        """Logits (len(ids), n_vocab) float32 at every position, from a fresh context."""
        self.cache.reset()
        return self._eval(ids, all_logits=True)

    # --- generation ---
    def generate(
        self,
        prompt,
        max_tokens=128,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        seed=None,
        stop_at_eos=True,
    ):
        """Yield text pieces of a continuation of `prompt` as they are produced.

        temperature 0 is greedy; `seed` makes sampling reproducible. Generation
        stops at end-of-generation tokens, after max_tokens, or when the
        context is full. Timings land in `self.timings`.
        """
        params = sampling.SamplerParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
        )
        if max_tokens < 0:
            raise OptionError("max_tokens must be >= 0")
        rng = np.random.default_rng(seed)
        ids = self.tokenize(prompt, add_bos=True)
        self.cache.reset()
        t0 = time.perf_counter()
        logits = self._eval(ids, all_logits=False)[-1]
        t1 = time.perf_counter()
        self.timings = {
            "prefill_tokens": len(ids),
            "prefill_s": t1 - t0,
            "decode_tokens": 0,
            "decode_s": 0.0,
        }
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        history = list(ids)
        for n in range(max_tokens):
            token = sampling.sample(logits, params, rng, history)
            if stop_at_eos and self.tokenizer.is_eog(token):
                break
            history.append(token)
            piece = decoder.decode(self.tokenizer.token_to_piece(token))
            if piece:
                yield piece
            if n + 1 == max_tokens or self.cache.n_past >= self.n_ctx:
                break
            t = time.perf_counter()
            logits = self._eval([token], all_logits=False)[-1]
            self.timings["decode_tokens"] += 1
            self.timings["decode_s"] += time.perf_counter() - t
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    # --- evaluation ---
    def perplexity(self, text, separator=None):
        """exp(mean negative log-likelihood) of `text`'s tokens.

        With `separator`, the text is split into documents on it and each is
        evaluated alone as BOS + document. A document longer than the context
        is cut into windows, each starting from a fresh context.
        """
        docs = [d.strip("\n") for d in text.split(separator)] if separator else [text]
        nll, count = 0.0, 0
        for doc in docs:
            if not doc.strip():
                continue
            ids = self.tokenize(doc, add_bos=True)
            for start in range(0, len(ids) - 1, self.n_ctx - 1):
                window = ids[start : start + self.n_ctx]
                if len(window) < 2:
                    break
                logp = log_softmax(self.logits(window))  # (W, V)
                targets = np.asarray(window[1:])
                nll -= float(logp[np.arange(len(targets)), targets].sum())
                count += len(targets)
        if count == 0:
            raise OptionError("perplexity needs at least two tokens of text")
        return math.exp(nll / count)

    # --- introspection ---
    def info(self):
        """Architecture, sizes, parameter counts and quant types."""
        from meldlite.modelinfo import model_info

        return model_info(self)

    def stats(self):
        """Counters of the expert store plus peak resident memory."""
        out = dict(self.store.stats()) if self.store else {}
        out["peak_rss_bytes"] = peak_rss_bytes()
        return out

    def close(self):
        if self.store:
            self.store.close()
