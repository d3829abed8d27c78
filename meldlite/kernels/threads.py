"""How many threads the kernels' parallel loops use, and how idle workers wait.

A decoded token runs about 50 parallel loops (2-3 per layer, the output head), each a
fork/join of Numba's OpenMP team. Measured on a 2-core Zen 5 (an empty 2-thread prange,
median, benchmarks/threads.py): a worker that sleeps when idle (OMP_WAIT_POLICY=passive)
takes 60-90 us to wake, 3-5 ms per token, more than the second core saves; one that
spins takes 2-9 us. libgomp's own default spins for several ms and OMP_WAIT_POLICY=active
forever (a worker left over after `set_threads(1)` then burns a core). GOMP_SPINCOUNT=30000
spins 0.5-1 ms: enough to cover the gaps between the loops of a token, short enough that
an idle process sleeps.
"""

import os

from meldlite.errors import OptionError

SPIN_COUNT = "30000"  # libgomp spin iterations before a worker sleeps (~0.5-1 ms here)


def bounded_spin(environ=os.environ):
    """Set GOMP_SPINCOUNT (bounded spinning) unless the environment already chose a wait
    policy or spin count; libgomp reads it once, when it loads. Returns the spin count in
    effect (None: the environment's OMP_WAIT_POLICY decides)."""
    if "OMP_WAIT_POLICY" in environ and "GOMP_SPINCOUNT" not in environ:
        return None
    return environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def check_threads(n_threads):
    """The thread count `n_threads` asks for (None: all cores); OptionError if out of range."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if n_threads is None else int(n_threads)
    if not 1 <= n <= limit:
        raise OptionError(f"threads must be in 1..{limit}, got {n_threads}")
    return n


def set_threads(n_threads):
    """Set the kernels' thread count (None: all cores); returns it."""
    import numba

    n = check_threads(n_threads)
    numba.set_num_threads(n)
    return n
