"""The pair-merge loop shared by the SPM and BPE tokenizers (llama.cpp's
`llm_tokenizer_{spm,bpe}_session::tokenize`): symbols form a linked list; a heap
holds adjacent pairs by priority (lowest key first, then leftmost); a popped pair
whose sides changed since it was queued is skipped.
"""

import heapq


def merge_pairs(text, priority):
    """Final symbols (strings) of merging `text`'s code points.

    priority(left, right) -> a sortable key (lower merges first) or None (never merge).
    """
    syms = list(text)
    n = len(syms)
    if n < 2:
        return syms
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []

    def push(left, right):
        if left >= 0 and right >= 0:
            key = priority(syms[left], syms[right])
            if key is not None:
                heapq.heappush(heap, (key, left, right, syms[left] + syms[right]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if not a or not b or a + b != merged:
            continue  # a side was merged since this pair was queued
        syms[left], syms[right] = merged, ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    return [s for s in syms if s]
