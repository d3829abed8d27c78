"""How many threads the kernels' parallel loops use."""

from meldlite.errors import OptionError


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
