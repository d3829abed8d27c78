"""Low-level I/O for expert offloading: reads into slabs, memory-map advice,
page-cache control, a storage-bandwidth emulator and process memory figures.

Everything here releases the GIL while it waits (os.preadv, os.posix_fadvise,
time.sleep, and madvise/mincore through ctypes), so a background loader thread
can run beside the compute thread without holding it up.

Page-cache discipline (see docs/experts.md): with a memory budget the model
file's expert pages must not stay in the page cache, or cache misses would be
served from RAM and the budget would be a fiction. Reads therefore use
POSIX_FADV_RANDOM (no readahead into neighbouring experts) and drop the range
they read with POSIX_FADV_DONTNEED; evictions from the memory map use
MADV_DONTNEED and then POSIX_FADV_DONTNEED. DONTNEED only drops clean pages that
no process maps: a model file on a read-only path is always clean, but another
process that maps the same file keeps its pages alive (`page_cache_fraction`
measures what is left).
"""

import ctypes
import ctypes.util
import mmap
import os
import threading
import time

import numpy as np

from meldlite.errors import FormatError
from meldlite.formats.gguf import pread_full

PAGE = mmap.PAGESIZE

MADV_NORMAL, MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED = 0, 1, 3, 4
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault pages in (reading them) now

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def page_span(offset, nbytes, outward=True):
    """(start, length) of the whole pages covering [offset, offset+nbytes)
    (outward), or of the pages lying wholly inside it (inward; length may be 0)."""
    if outward:
        start = offset // PAGE * PAGE
        end = -(-(offset + nbytes) // PAGE) * PAGE
    else:
        start = -(-offset // PAGE) * PAGE
        end = max(start, (offset + nbytes) // PAGE * PAGE)
    return start, end - start


def madvise(addr, length, advice):
    """madvise(2) on [addr, addr+length); addr must be page-aligned. OSError on failure."""
    if length <= 0:
        return
    if _libc.madvise(ctypes.c_void_p(addr), length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


def drop_range(fd, offset, nbytes):
    """Ask the kernel to drop [offset, offset+nbytes) of the file from the page cache
    (whole pages, rounded outward; mapped or dirty pages stay)."""
    start, length = page_span(offset, nbytes)
    os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


def page_cache_fraction(path, ranges=None):
    """Fraction of the pages of `path` (or of the (offset, nbytes) `ranges`) that are
    in the page cache now, measured with mincore(2) on a fresh read-only map."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = np.frombuffer(m, np.uint8)  # (size,) read-only
    try:
        vec = np.zeros(-(-size // PAGE), np.uint8)  # (n_pages,)
        if _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore failed: {os.strerror(err)}")
    finally:
        del view
        m.close()
    resident = (vec & 1).astype(bool)
    if ranges is None:
        return float(resident.mean())
    mask = np.zeros_like(resident)
    for off, n in ranges:
        start, length = page_span(off, n)
        mask[start // PAGE : (start + length) // PAGE] = True
    return float(resident[mask].mean()) if mask.any() else 0.0


def drop_file_cache(path):
    """Drop `path` from the page cache (POSIX_FADV_DONTNEED over the whole file).

    Returns (fraction cached before, fraction cached after), measured with mincore.
    Only clean pages that no process maps are dropped, so `after` may stay above 0
    when another process (or this one) maps the file."""
    before = page_cache_fraction(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return before, page_cache_fraction(path)


class Throttle:
    """Emulates a storage device of `bytes_per_s` bandwidth (a measurement aid).

    The device serves one transfer at a time: a read of n bytes that starts when
    the device is free at t ends at t + n / bandwidth; reads from several threads
    queue behind each other. `transfer(n, fn)` runs the real read `fn()` and then
    sleeps until the emulated end (if the real read took longer, that is the time
    it takes). Emulation only slows reads down; it cannot make storage faster.
    time.sleep wakes up late (~0.05-0.1 ms); that lateness is the emulator's, not
    the device's, so a thread's next read may start as early as the moment its
    previous one should have woken it (a real read returns when its data is in).
    """

    def __init__(self, bytes_per_s):
        self.bytes_per_s = float(bytes_per_s)
        self._lock = threading.Lock()
        self._free_at = 0.0
        self._late = threading.local()

    def transfer(self, nbytes, fn):
        now = time.perf_counter()
        with self._lock:
            start = max(now - getattr(self._late, "s", 0.0), self._free_at)
            end = start + nbytes / self.bytes_per_s
            self._free_at = end
        self._late.s = 0.0
        result = fn()
        wait = end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            self._late.s = max(0.0, time.perf_counter() - end)
        else:  # the real read was slower than the emulation
            with self._lock:
                self._free_at = max(self._free_at, time.perf_counter())
        return result


DIO_ALIGN = 4096  # O_DIRECT offset/length/buffer alignment (safe for 512 B and 4 kB devices)


class ExpertFile:
    """The model file opened for expert reads: `read_into` copies byte ranges into
    slabs with os.preadv (one call per contiguous range), `populate`/`release`
    manage pages of the process's memory map of the same file.

    direct=True opens a second descriptor with O_DIRECT: reads go from storage
    straight into the (aligned) slab, bypassing the page cache (no copy, no
    cached pages to drop); callers then read whole DIO_ALIGN blocks. If the file
    system refuses O_DIRECT, `self.direct` is False and buffered reads are used."""

    def __init__(
        self, path, throttle=None, drop_cache=True, map_base=None, map_size=0, direct=False
    ):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.fd_direct = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd_direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.fd_direct = -1
        self.direct = self.fd_direct >= 0
        self.throttle = throttle
        self.drop_cache = drop_cache
        self.map_base = map_base  # address of byte 0 of the file's memory map
        self.map_size = map_size
        self._populate_ok = True

    def read_into(self, buf, offset, need=None):
        """Fill the writable buffer `buf` (uint8 array or memoryview) with the file's
        bytes at `offset`; at least `need` bytes (default all) must exist (a direct
        read of whole blocks may end early at the end of the file). Returns the
        number of bytes read."""
        view = memoryview(buf).cast("B")
        n = view.nbytes
        need = n if need is None else need
        fd = self.fd_direct if self.direct else self.fd

        def read():
            done = pread_full(fd, view, offset)
            if done < need:
                raise FormatError(
                    f"{self.path}: file ends at byte {offset + done}, "
                    f"expected expert bytes up to {offset + need}"
                )
            if self.drop_cache and not self.direct:
                drop_range(fd, offset, n)
            return done

        return self.throttle.transfer(n, read) if self.throttle else read()

    # -- memory-map mechanism ------------------------------------------------

    def _map_span(self, offset, nbytes, outward=True):
        start, length = page_span(offset, nbytes, outward)
        length = min(length, self.map_size - start)
        return self.map_base + start, length

    def populate(self, offset, nbytes):
        """Bring the map's pages over [offset, offset+nbytes) into this process
        (reading them from storage), throttled like a read. Returns nbytes."""
        addr, length = self._map_span(offset, nbytes)

        def fault_in():
            # the map is MADV_RANDOM (no read-around into other experts), so a bare
            # populate would read page by page (~55 MB/s here): WILLNEED first reads
            # the range in large requests (~760 MB/s), then POPULATE maps it
            madvise(addr, length, MADV_WILLNEED)
            if self._populate_ok:
                try:
                    madvise(addr, length, MADV_POPULATE_READ)
                    return nbytes
                except OSError:
                    self._populate_ok = False  # kernel < 5.14: touch the pages instead
            pages = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))
            int(pages[::PAGE].sum())
            return nbytes

        return self.throttle.transfer(nbytes, fault_in) if self.throttle else fault_in()

    def release(self, offset, nbytes):
        """Unmap the map's pages over the range from this process and drop them from
        the page cache. Pages shared with a neighbouring range are released too;
        a later access to them faults them in again (correct, just slower)."""
        addr, length = self._map_span(offset, nbytes)
        madvise(addr, length, MADV_DONTNEED)
        if self.drop_cache:
            drop_range(self.fd, offset, nbytes)

    def advise(self, offset, nbytes, advice, outward=False):
        """madvise over the map's pages of a range (inward: only whole pages inside)."""
        addr, length = self._map_span(offset, nbytes, outward)
        if length > 0:
            madvise(addr, length, advice)

    def close(self):
        for name in ("fd", "fd_direct"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


# -- process memory ----------------------------------------------------------


def memory_status():
    """{VmRSS, VmHWM, RssAnon, RssFile, ...} of this process in bytes (Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss():
    """Reset this process's peak RSS (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
