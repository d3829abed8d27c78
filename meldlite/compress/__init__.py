"""Compression of MoE models: `meldlite quantize` (uniform and per-expert mixed
precision files) and expert pruning.

- `quantize.py`: the entry point, `quantize_model(src, out, qtype= | size= | bpw=, profile=)`.
- `ladder.py`: which type each tensor gets (llama.cpp's rules and fallbacks) and the float -> type step.
- `write.py`: writing stacked or per-expert files through `formats.pack`'s writer.
- `sensitivity.py`, `plan.py`, `mixed.py`: per-expert errors from calibration rows,
  the allocation under a size budget, and the mixed file.
- `result.py`: `QuantizeResult`, what `quantize_model` returns.
- `quantizers/`: the jitted quantizers themselves (float rows -> ggml blocks) and their
  NumPy references.
"""
