"""What the expert cache counts and times, and the running estimates it plans with."""

from dataclasses import dataclass

SPLIT_COST = 3e-4  # seconds an extra kernel call + combine cost (measured, docs/experts.md)


@dataclass
class CacheCounters:
    """Events of a `CachedStore` since it was made (reported by `stats()`)."""

    expert_hits: int = 0  # experts a layer visit found cached
    expert_misses: int = 0  # experts it had to wait for or read
    bytes_read: int = 0  # by every load
    bytes_read_prefetch: int = 0  # by the loader's guesses
    loads: int = 0  # experts read (demand, prefetch and preload)
    loads_preload: int = 0  # read by `preload` before the first token
    evictions: int = 0
    prefetch_issued: int = 0  # guesses read by the loader
    prefetch_useful: int = 0  # of those, used before being evicted
    prefetch_wasted: int = 0  # of those, evicted unused
    prefetch_late: int = 0  # still being read when their layer ran
    prefetch_refused: int = 0  # guesses the policy let evict nothing
    predicted: int = 0  # router guesses for the next layer (decode)
    predicted_right: int = 0  # of those, routed to
    actual_routed: int = 0  # experts routed to where guesses were made
    announced: int = 0  # experts a layer's early router named before its attention
    expert_uses: int = 0  # distinct experts per layer visit, summed
    moe_calls: int = 0  # layer visits
    groups_split: int = 0  # kernel calls on a part of a layer's experts


@dataclass
class CacheTimers:
    """Seconds spent by the compute thread waiting and by all reads."""

    stall_seconds: float = 0.0  # compute thread waiting for experts (reads included)
    io_seconds: float = 0.0  # reading experts, on either thread


class Estimates:
    """Running means of measured times: kernel seconds per (token, expert) pair
    and load seconds per byte; None until measured."""

    def __init__(self):
        self.per_pair = None
        self.per_byte = None

    def note_compute(self, seconds, n_pairs):
        if n_pairs:
            self.per_pair = _mean(self.per_pair, seconds / n_pairs)

    def note_read(self, seconds, nbytes):
        self.per_byte = _mean(self.per_byte, seconds / max(1, nbytes))

    def worth_splitting(self, hit_pairs, missing_bytes):
        """Computing the cached experts while the rest loads saves
        min(their compute time, the load time); a split costs a kernel call and
        the combine."""
        if self.per_pair is None or self.per_byte is None:
            return True
        return min(hit_pairs * self.per_pair, missing_bytes * self.per_byte) > SPLIT_COST


def _mean(old, new):
    return new if old is None else 0.9 * old + 0.1 * new
