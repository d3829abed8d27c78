#!/usr/bin/env bash
# The kernel and parity tests on aarch64, under user-mode emulation (qemu-user-static),
# on an x86-64 Debian/Ubuntu machine as root. See docs/speed.md, "ARM (aarch64)".
#
#   scripts/test-arm64.sh                 setup if needed, refs if stale, then the subset
#   scripts/test-arm64.sh setup           Debian arm64 root filesystem + aarch64 wheels
#   scripts/test-arm64.sh refs            llama.cpp's logits here (x86, llama-cpp-python)
#   scripts/test-arm64.sh test [ARGS]     pytest under emulation: ARGS, else the subset
#   scripts/test-arm64.sh shell [ARGS]    the arm64 python itself, e.g. shell -c "..."
#   scripts/test-arm64.sh clean           remove the cache folder
#
# Everything lives in $MELDLITE_ARM64_CACHE (default ~/.cache/meldlite-arm64, ~570 MB):
# rootfs/ (Debian with python3 and libgomp1), site/ (NumPy, Numba, gguf, pytest wheels
# for aarch64, the versions installed here), refs/ (the models and logits of
# tests/test_parity_saved.py), numba/ (Numba's cache: the first run compiles every
# kernel under emulation, ~20 min of CPU; later runs of the subset take ~1.5 min), tmp/.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${MELDLITE_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meldlite-arm64}
ROOTFS=$CACHE/rootfs SITE=$CACHE/site REFS=$CACHE/refs
SUITE=${MELDLITE_ARM64_SUITE:-bookworm}   # its python3 is the one the wheels are for

# the fast subset: kernels against their NumPy references and gguf-py, then logits
# against llama.cpp's saved ones
SUBSET=(
  tests/test_qdot.py
  tests/test_kernels.py
  tests/test_actquant.py
  tests/test_route.py
  tests/test_swa.py
  tests/test_yarn.py
  "tests/test_deepseek2.py::test_mla_block_matches_numpy_reference"
  tests/test_parity_saved.py
)

log() { echo "[test-arm64] $*" >&2; }

host_version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }

setup() {
  [ "$(uname -m)" = x86_64 ] || log "warning: written for an x86-64 host, this is $(uname -m)"
  if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && apt-get install -y -qq qemu-user-static debootstrap
  fi
  if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    log "debootstrap $SUITE arm64 into $ROOTFS (a few minutes)"
    # --foreign downloads the packages and unpacks the required ones; the rest are
    # unpacked here too, without their maintainer scripts (which would need arm64
    # binaries to run): enough for python3 and the wheels, no binfmt_misc needed
    rm -rf "$ROOTFS" && mkdir -p "$ROOTFS"
    debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,libgomp1 \
      "$SUITE" "$ROOTFS" http://deb.debian.org/debian >"$CACHE/debootstrap.log"
    for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOTFS"; done
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  fi
  local py want have
  py=$(basename "$(readlink -f "$ROOTFS/usr/bin/python3")")   # python3.11
  want="numpy==$(host_version numpy) numba==$(host_version numba) llvmlite==$(host_version llvmlite)"
  want="$want gguf==$(host_version gguf) pytest jinja2 click pyzmq"
  have=$(cat "$SITE/.wanted" 2>/dev/null || true)
  if [ "$have" != "$py $want" ]; then
    log "aarch64 wheels for $py into $SITE: $want"
    rm -rf "$SITE"
    # shellcheck disable=SC2086
    python -m pip install --quiet --disable-pip-version-check --target "$SITE" \
      --only-binary=:all: --implementation cp --python-version "${py#python}" \
      --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 \
      --platform manylinux_2_17_aarch64 $want
    echo "$py $want" >"$SITE/.wanted"
  fi
}

refs() {
  if ! python -c "import llama_cpp" 2>/dev/null; then
    log "no llama-cpp-python here: no saved logits, test_parity_saved will skip"
    return 0
  fi
  log "llama.cpp's logits into $REFS (this machine, llama-cpp-python)"
  nice -n 19 python scripts/parity_refs.py "$REFS"
}

refs_stale() {
  [ ! -f "$REFS/refs.npz" ] || [ scripts/parity_refs.py -nt "$REFS/refs.npz" ] ||
    [ tests/helpers_models.py -nt "$REFS/refs.npz" ]
}

arm() {   # the arm64 python, through qemu explicitly; QEMU_LD_PREFIX also serves
  local py  # processes it starts where binfmt_misc runs aarch64 binaries
  py=$(readlink -f "$ROOTFS/usr/bin/python3")
  mkdir -p "$CACHE/numba" "$CACHE/tmp"
  QEMU_LD_PREFIX=$ROOTFS PYTHONPATH=$PWD:$SITE NUMBA_CACHE_DIR=$CACHE/numba TMPDIR=$CACHE/tmp \
    MELDLITE_PARITY_REFS=$REFS/refs.npz PYTHONDONTWRITEBYTECODE=1 \
    nice -n 19 qemu-aarch64-static -L "$ROOTFS" "$py" "$@"
}

run_tests() {
  local args=("$@")
  [ ${#args[@]} -gt 0 ] || args=("${SUBSET[@]}")
  arm -c "import platform, numpy, numba; print('python', platform.python_version(),
platform.machine(), 'numpy', numpy.__version__, 'numba', numba.__version__)"
  local t0=$SECONDS rc=0
  arm -m pytest -p no:cacheprovider --basetemp="$CACHE/tmp/pytest" -q \
    --durations=15 "${args[@]}" || rc=$?
  rm -rf "$CACHE/tmp/pytest"
  log "pytest under emulation: $((SECONDS - t0)) s, exit $rc"
  return $rc
}

case "${1:-all}" in
  setup) setup ;;
  refs) refs ;;
  test) shift; run_tests "$@" ;;
  shell) shift; arm "$@" ;;
  clean) rm -rf "$CACHE" ;;
  all)
    setup
    if refs_stale; then refs; fi
    run_tests
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
