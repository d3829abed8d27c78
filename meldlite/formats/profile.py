"""The expert profile file that `meldlite profile` writes (experts/profile.py builds it).

The file is JSON, `"format": "meldlite-expert-profile"`, `"version": 2`; the
fields are listed in docs/experts.md. Arrays of floats that can be large are
stored as {"dtype", "shape", "base64"} (little-endian). The calibration sample
is a sidecar `.npz` next to the JSON, named in its `calibration.file`.
`read_profile` also reads version 1 (no calibration data). `load_prior` reads a
profile back as the per-layer expert popularity (the cache policies' prior).
"""

import base64
import json
import os
from pathlib import Path

import numpy as np

from meldlite.errors import FormatError, OptionError

FORMAT = "meldlite-expert-profile"
VERSION = 2
READS = (1, 2)  # versions read_profile accepts
CALIB_SUFFIX = ".calib.npz"


def encode_array(a):
    a = np.ascontiguousarray(a, dtype="<f4")
    return {
        "dtype": "float32",
        "shape": list(a.shape),
        "base64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def decode_array(obj):
    if not isinstance(obj, dict) or obj.get("dtype") != "float32":
        raise FormatError("profile array is not a {dtype: float32, shape, base64} object")
    raw = base64.b64decode(obj["base64"])
    return np.frombuffer(raw, "<f4").reshape(obj["shape"]).astype(np.float32)


class Profile(dict):
    """A profile dict; `calibration` holds the sample's arrays until it is saved,
    `path` where it was read from (to find the sidecar)."""

    calibration = None
    path = None


def save_profile(profile, path):
    """Write the JSON at `path` and, when the profile holds a calibration sample,
    the sidecar `path` + CALIB_SUFFIX (named in the JSON, relative to it)."""
    path = Path(path)
    sample = getattr(profile, "calibration", None)
    if sample is not None:
        side = path.with_name(path.name + CALIB_SUFFIX)
        tmp = side.with_name(side.name + ".tmp.npz")
        arrays = {
            f"{name}{L}": a
            for L, layer in enumerate(sample)
            for name, a in zip(("x", "ids", "w"), layer)
        }
        np.savez(tmp, **arrays)
        os.replace(tmp, side)
        profile["calibration"] = dict(profile["calibration"], file=side.name)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(profile, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


def read_profile(path):
    """The profile (`Profile` dict) at `path`; FormatError if it is not a profile
    this version reads."""
    try:
        with open(path, encoding="utf-8") as f:
            prof = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not a JSON profile: {e}") from None
    if not isinstance(prof, dict) or prof.get("format") != FORMAT:
        raise FormatError(f"{path}: not a meldlite expert profile (format != {FORMAT!r})")
    if prof.get("version") not in READS:
        raise FormatError(
            f"{path}: profile version {prof.get('version')!r}, this meldlite reads "
            f"{', '.join(map(str, READS))}"
        )
    prof = Profile(prof)
    prof.path = Path(path)
    return prof


def load_calibration(profile):
    """The calibration sample of a profile (path, or `Profile` read from a file or just
    built): per layer (x (n, n_embd) float16, ids (n, k) int16, weights (n, k) float32).
    FormatError if the profile has none or its sidecar is missing or malformed."""
    prof = profile if isinstance(profile, dict) else read_profile(profile)
    if getattr(prof, "calibration", None) is not None:
        return prof.calibration
    meta = prof.get("calibration")
    where = getattr(prof, "path", None) or "profile"
    if not meta or not meta.get("file") or getattr(prof, "path", None) is None:
        raise FormatError(
            f"{where}: the profile has no calibration data "
            f"(version {prof.get('version')}); run `meldlite profile` again"
        )
    side = prof.path.with_name(meta["file"])
    n_layer = prof["model"]["n_layer"]
    try:
        with np.load(side, allow_pickle=False) as z:
            sample = [(z[f"x{L}"], z[f"ids{L}"], z[f"w{L}"]) for L in range(n_layer)]
    except (OSError, KeyError, ValueError) as e:
        raise FormatError(f"{side}: cannot read the profile's calibration data: {e}") from None
    for L, (x, ids, w) in enumerate(sample):
        n, k = len(x), prof["model"]["n_expert_used"]
        if (
            x.shape != (n, prof["model"]["n_embd"])
            or ids.shape != (n, k)
            or w.shape != (n, k)
            or not np.isfinite(x).all()
            or ids.max(initial=-1) >= prof["model"]["n_expert"]
        ):
            raise FormatError(
                f"{side}: layer {L} calibration arrays have the wrong shape or values"
            )
    prof.calibration = sample
    return sample


def load_prior(profile, cfg):
    """Per-layer expert popularity (n_layer, n_expert) from a profile (dict or path),
    checked against the model's shape."""
    prof = profile if isinstance(profile, dict) else read_profile(profile)
    m = prof.get("model", {})
    if (m.get("n_layer"), m.get("n_expert")) != (cfg.n_layer, cfg.n_expert):
        raise OptionError(
            f"profile is for a model with {m.get('n_layer')} layers x "
            f"{m.get('n_expert')} experts, this one has {cfg.n_layer} x {cfg.n_expert}"
        )
    try:
        share = np.array([lay["share"] for lay in prof["layers"]], np.float64)
    except (KeyError, TypeError, ValueError):
        raise FormatError("profile layers lack a valid 'share' list") from None
    if share.shape != (cfg.n_layer, cfg.n_expert) or not np.isfinite(share).all():
        raise FormatError(
            f"profile 'share' has shape {share.shape}, expected ({cfg.n_layer}, {cfg.n_expert})"
        )
    return share
