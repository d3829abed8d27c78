"""The public Python API: `meldlite.load(...) -> Model`."""

import codecs
import inspect
import math
import os
import resource
import time

import numpy as np

from meldlite import sampling
from meldlite.chat import Reply
from meldlite.config import ModelConfig
from meldlite.data import default_model_path
from meldlite.errors import OptionError
from meldlite.experts import make_store
from meldlite.experts.io import drop_file_cache, memory_status
from meldlite.experts.limit import LimitSizing, margin_bytes
from meldlite.formats import read_gguf
from meldlite.kernels import prepare_target, release_compiler_pages, trim_heap
from meldlite.kernels.threads import set_threads
from meldlite.metrics import log_softmax
from meldlite.model import KVCache, check_weights, forward
from meldlite.options import Generation, Runtime, Sampler, Store, from_keywords, load_keywords
from meldlite.tokenizer import Tokenizer
from meldlite.units import parse_limit
from meldlite.weights import Weights


def load(path=None, **options):
    """Open a GGUF model (`None`: the built-in default model).

    The keywords below fill the option groups of `meldlite.options` (`Runtime`,
    `Store`, `Peers`), where each is declared, defaulted and checked once;
    `Model(path, runtime=..., store=..., peers=...)` takes the groups themselves.

    n_ctx: context length (default: the model's training context, at most 4096);
    n_threads: compute threads (default: all cores); n_batch: prompt tokens per
    forward call during prefill; n_parallel: sequences kept and decoded together
    (`Model._eval_seqs`), each with a KV cache of n_ctx positions; llama_numerics: round activations before each
    quantized matmul as llama.cpp does (8-bit blocks for quantized weights,
    f16 for F16), which makes logits agree with llama.cpp's; False computes
    with float activations instead.

    Expert offloading (docs/experts.md): mem_budget ("64MB", "1.5GB", "25%" of
    the expert bytes, or bytes) keeps at most that much expert weight in memory,
    reading experts from the file when routed to (None: all experts stay in the
    memory map; with a budget the non-expert weights are copied into memory);
    mem_limit ("340MB", not with mem_budget): the memory of the whole process,
    of which the experts get what the runtime, the non-expert weights, the KV
    cache and a margin leave (`Model.stats()` shows the split);
    cache_policy "forecast" (default), "lfu" or "lru"; prefetch:
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
    request and per start-up step of a peer; link ("100Mbit/5ms"): link emulation, a measurement aid.
    """
    return Model(path, **from_keywords(options))


def _load_signature():
    """`load`'s signature as `inspect` shows it: path, then every keyword the
    option groups give `load`, with its default."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
    params += [inspect.Parameter(k, kw, default=d) for k, (_, _, d) in load_keywords().items()]
    return inspect.Signature(params)


load.__signature__ = _load_signature()


def peak_rss_bytes():
    """Peak resident set size of this process so far: VmHWM where /proc has it. Not
    getrusage's ru_maxrss, which in a process started by fork (or vfork) and exec also
    counts the parent's resident memory at the fork (a test runner's hundreds of MiB)."""
    hwm = memory_status().get("VmHWM")
    return hwm if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Model:
    """A loaded model: tokenizer, resident weights, expert store and KV cache."""

    def __init__(self, path=None, runtime=Runtime(), store=Store(), peers=None):
        """path: a GGUF file (None: the built-in model); runtime, store, peers: the
        option groups of `meldlite.options` (peers None: every expert computed here).

        The expert store stack is built here: the local store (`make_store`), and
        over it a `RemoteStore` when peers are given (the local store then serves
        the experts placed here and failover)."""
        self.path = default_model_path() if path is None else os.fspath(path)
        self.runtime = runtime
        prepare_target()  # Numba's setup, without the compiler's pages of the import
        self.cold_cache = drop_file_cache(self.path) if runtime.cold else None  # (before, after)
        self.gguf = read_gguf(self.path)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
        self.weights = Weights(self.gguf, runtime.llama_numerics)
        if store.budgeted:  # memory is tight: no re-reads of these under it
            # the embedding is read a row per token: left in the map unless it is the output
            rows_only = ("token_embd.weight",) if "output.weight" in self.weights else ()
            self.weights.keep_resident(skip=rows_only)
        self.cfg = ModelConfig.from_metadata(
            self.gguf.metadata, n_vocab=self.weights["token_embd.weight"].shape[0]
        )
        check_weights(self.cfg, self.weights)
        self.n_ctx = min(self.cfg.n_ctx_train, 4096) if runtime.n_ctx is None else runtime.n_ctx
        if not 1 <= self.n_ctx <= 1 << 20:
            raise OptionError(f"n_ctx must be in 1..{1 << 20}, got {self.n_ctx}")
        self.n_batch = runtime.n_batch
        self.n_threads = set_threads(runtime.n_threads)
        self.route_observers = []  # callables (layer, x (T, E), ids (T, k), weights (T, k))
        self.route_counts = {"routed_slots": 0, "experts_skipped": 0}
        self.cache = KVCache(self.cfg, self.n_ctx, n_seq=runtime.n_parallel)
        self.limit = self._limit_sizing(store)  # None without mem_limit
        self.store = self._build_store(store, peers)
        self.timings = {}
        self._settled = False  # the first forward pass loads the kernels, then settles
        release_compiler_pages()  # what loading the kernels of the checks mapped

    def _limit_sizing(self, store):
        """How `mem_limit` splits (experts/limit.py), from the RSS now: the runtime and
        the non-expert weights, copied in by now (None without mem_limit)."""
        if store.mem_limit is None:
            return None
        release_compiler_pages()  # what loading the kernels of the checks mapped
        return LimitSizing(
            limit=parse_limit(store.mem_limit),
            resident=memory_status().get("VmRSS") or peak_rss_bytes(),
            weights=self.weights.resident_bytes,
            kv=self.cache.nbytes,
            margin=margin_bytes(self.cfg, min(self.n_batch, self.n_ctx)),  # a chunk's tokens
        )

    def _build_store(self, store, peers):
        """The local store, wrapped by a RemoteStore when there are peers (None: dense)."""
        if not self.cfg.is_moe:
            if store.budgeted:
                raise OptionError(
                    "mem_budget and mem_limit apply to Mixture-of-Experts models; this one "
                    "has no experts"
                )
            if peers is not None:
                raise OptionError("peers serve routed experts; this model has none")
            return None
        numerics = self.weights.llama_numerics
        local = make_store(
            self.gguf, self.cfg, self.weights, store, llama_numerics=numerics, sizing=self.limit
        )
        if peers is None:
            return local
        from meldlite.transports.remote import RemoteStore

        try:
            return RemoteStore(self.gguf, self.cfg, peers, local=local, llama_numerics=numerics)
        except BaseException:
            local.close()
            raise

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
            logits = self._forward(chunk, all_logits)
            if all_logits or last:
                out.append(logits)
        return np.concatenate(out) if out else np.zeros((0, self.cfg.n_vocab), np.float32)

    def _eval_seqs(self, ids, seqs):
        """Feed several sequences' tokens through one forward pass: ids is the
        concatenation of the segments' tokens, seqs the (seq, n) segments (see
        `model.forward`). Returns (S, V) float32, each segment's last-token logits, in
        segment order. No n_batch chunking: the caller sizes the batch."""
        return self._forward(self._check_ids(ids, seqs), False, seqs)

    def _forward(self, ids, all_logits, seqs=None):
        """`model.forward` of ids with this model's route observers and adaptive top-k."""
        logits = forward(
            self.cfg,
            self.weights,
            self.store,
            self.cache,
            ids,
            all_logits=all_logits,
            on_route=self._observe if self.route_observers else None,
            min_expert_weight=self.runtime.min_expert_weight,
            route_counts=self.route_counts,
            seqs=seqs,
        )
        if not self._settled:  # drop what loading the forward pass's kernels left mapped
            self._settled = True
            release_compiler_pages()
            trim_heap()
        return logits

    def _observe(self, layer, x, ids, weights):
        for observe in self.route_observers:
            observe(layer, x, ids, weights)

    def _check_ids(self, ids, seqs=None):
        """ids as an int64 array, checked: in the vocabulary, and each (seq, n) segment's
        n tokens fit sequence seq's context (seqs None: all of ids in sequence 0)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.n_vocab):
            raise OptionError(f"token ids must be in 0..{self.cfg.n_vocab - 1}")
        for seq, n in [(0, ids.size)] if seqs is None else seqs:
            held = self.cache.seq(seq).n_past
            if held + n > self.n_ctx:
                where = f"sequence {seq}: " if self.cache.n_seq > 1 else ""
                raise OptionError(
                    f"{where}{held + n} tokens do not fit the context "
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
        max_tokens=Generation.max_tokens,
        temperature=Sampler.temperature,
        top_k=Sampler.top_k,
        top_p=Sampler.top_p,
        min_p=Sampler.min_p,
        repeat_penalty=Sampler.repeat_penalty,
        seed=Sampler.seed,
        stop_at_eos=True,
        sampler=None,
    ):
        """Yield text pieces of a continuation of `prompt` as they are produced.

        temperature 0 is greedy; `seed` makes sampling reproducible; `sampler`, a
        `meldlite.options.Sampler`, replaces the sampling keywords. Generation
        stops at end-of-generation tokens, after max_tokens, or when the
        context is full. Timings land in `self.timings`, and why generation
        stopped in `self.timings["stop_reason"]`: "eog" (an end-of-generation
        token), "max_tokens", "context_full" (None while running or when the
        caller stopped early).
        """
        params = sampler or Sampler(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
        )
        seed = params.seed
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
            "stop_reason": "max_tokens" if max_tokens == 0 else None,
        }
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        history = list(ids)
        for n in range(max_tokens):
            token = sampling.sample(logits, params, rng, history)
            if stop_at_eos and self.tokenizer.is_eog(token):
                self.timings["stop_reason"] = "eog"
                break
            history.append(token)
            piece = decoder.decode(self.tokenizer.token_to_piece(token))
            if piece:
                yield piece
            if n + 1 == max_tokens or self.cache.n_past >= self.n_ctx:
                full = n + 1 < max_tokens
                self.timings["stop_reason"] = "context_full" if full else "max_tokens"
                break
            t = time.perf_counter()
            logits = self._eval([token], all_logits=False)[-1]
            self.timings["decode_tokens"] += 1
            self.timings["decode_s"] += time.perf_counter() - t
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    # --- chat ---
    @property
    def chat_template(self):
        """The model's ChatTemplate (its tokenizer.chat_template, else ChatML)."""
        if getattr(self, "_chat_template", None) is None:
            from meldlite.tokenizer.chat import ChatTemplate  # jinja2: loaded for chat only

            self._chat_template = ChatTemplate.for_model(self.gguf.metadata, self.tokenizer)
        return self._chat_template

    def chat(self, messages, max_tokens=Generation.max_tokens, stop=(), sampler=None,
             template=None, **sampling_keywords):  # fmt: skip
        """A `meldlite.chat.Reply` to `messages` ([{"role", "content"}, ...]): iterate it
        for text pieces, then read `text`, `finish_reason` and `usage`. The prompt
        reuses the KV cache of the part a previous chat call already ran (multi-turn
        chat does not re-read the history). `template`: a ChatTemplate (default: the
        model's); sampling as in `generate` (`sampler` or its keywords)."""
        from meldlite.tokenizer.chat import prompt_ids

        text = (template or self.chat_template).render(messages, add_generation_prompt=True)
        ids = prompt_ids(self.tokenizer, text)
        return Reply(self, ids, sampler or Sampler(**sampling_keywords), max_tokens, stop)

    def complete(self, prompt, max_tokens=Generation.max_tokens, stop=(), sampler=None,
                 **sampling_keywords):  # fmt: skip
        """A `meldlite.chat.Reply` continuing the raw text `prompt` (BOS per the
        vocabulary), with the stop strings, finish reason, usage and KV reuse of `chat`."""
        if not isinstance(prompt, str):
            raise OptionError("prompt must be text")
        ids = self.tokenize(prompt, add_bos=True)
        return Reply(self, ids, sampler or Sampler(**sampling_keywords), max_tokens, stop)

    # --- evaluation ---
    def perplexity(self, text, separator=None):
        """exp(mean negative log-likelihood) of `text`'s tokens.

        With `separator`, the text is split into documents on it and each is
        evaluated alone as BOS + document. A document longer than the context
        is cut into windows, each starting from a fresh context.
        """
        if self.n_ctx < 2:
            raise OptionError(f"perplexity needs a context of at least 2 tokens, got {self.n_ctx}")
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
        """Counters of the expert store and of routing (adaptive top-k's
        `routed_slots`, `experts_skipped`), plus peak resident memory and the KV cache's
        bytes per token (`kv_bytes_per_token`, and `kv_bytes_per_token_full` for full keys
        and values: they differ for latent attention), the bytes the cache holds for all
        its sequences (`kv_bytes`) and their number (`n_parallel`)."""
        out = dict(self.store.stats()) if self.store else {}
        if self.store:
            out.update(self.route_counts)
        out["peak_rss_bytes"] = peak_rss_bytes()
        cached, full = self.cfg.kv_bytes_per_token()
        out["kv_bytes_per_token"], out["kv_bytes_per_token_full"] = cached, full
        out["kv_bytes"], out["n_parallel"] = self.cache.nbytes, self.cache.n_seq
        out["weights_resident_bytes"] = self.weights.resident_bytes  # copied out of the map
        if self.limit is not None:
            out.update(self.limit.stats())
        return out

    def close(self):
        if self.store:
            self.store.close()
