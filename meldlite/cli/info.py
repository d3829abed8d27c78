"""`meldlite info`: what a model file holds."""

import json

import click

from meldlite.cli import command


@command("info")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--experts",
    "full",
    is_flag=True,
    help="Every expert's types (and popularity/sensitivity when the file has them), "
    "not just a per-layer summary.",
)
def info(model, as_json, full):
    """Architecture, sizes, parameters and quant types of MODEL."""
    import meldlite

    d = meldlite.load(model, n_ctx=16).info()
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    for line in format_info(d, full):
        click.echo(line)


def format_info(d, full=False):
    yield f"model        {d['path']}"
    yield f"architecture {d['architecture']}  ({d['name']})"
    yield (
        f"size         {d['file_bytes'] / 2**20:.2f} MiB of tensors, experts "
        f"{d['expert_bytes'] / 2**20:.2f} MiB ({d['expert_layout'] or 'dense'})"
    )
    yield (
        f"shape        vocab {d['n_vocab']}, ctx {d['n_ctx_train']}, embd {d['n_embd']}, "
        f"layers {d['n_layer']}, heads {d['n_head']}/{d['n_head_kv']} x {d['head_dim']}"
    )
    if d["kv_lora_rank"]:
        yield (
            f"attention    latent (MLA): kv_lora_rank {d['kv_lora_rank']}, "
            f"q_lora_rank {d['q_lora_rank'] or 'none (attn_q)'}"
        )
    yield (
        f"kv cache     {d['kv_bytes_per_token']:,} bytes per token"
        + (
            f" (full keys and values: {d['kv_bytes_per_token_naive']:,})"
            if d["kv_bytes_per_token_naive"] != d["kv_bytes_per_token"]
            else ""
        )
    )
    if d["n_expert"]:
        yield (
            f"experts      {d['n_expert_used']} of {d['n_expert']} per token, FFN {d['n_ff_exp']}"
            + (f", shared FFN {d['n_ff_shexp']}" if d["n_ff_shexp"] else "")
            + (f", first {d['n_layer_dense_lead']} layers dense" if d["n_layer_dense_lead"] else "")
        )
    else:
        yield f"ffn          {d['n_ff']}"
    if d.get("n_swa"):
        yield (
            f"attention    sliding window {d['n_swa']} on {len(d['swa_layers'])} of "
            f"{d['n_layer']} layers (their KV cache keeps the window only)"
        )
    yield f"parameters   {d['params_total']:,} total, {d['params_active']:,} active per token"
    yield "types        " + ", ".join(f"{k} x{v}" for k, v in sorted(d["tensor_types"].items()))
    yield ""
    yield f"{'tensor':<36} {'type':<7} {'shape':<20} bytes"
    for t in d["tensors"]:
        if "_exps." in t["name"] and d["expert_layout"] == "per_expert":
            continue
        yield f"{t['name']:<36} {t['type']:<7} {tuple(t['shape'])!s:<20} {t['bytes']}"
    if d["expert_types"]:
        yield ""
        yield "expert types (gate/up/down, or one type for all three) per layer:"
        yield from (_full_map(d) if full else _summary(d))


def _summary(d):
    from meldlite.modelinfo import expert_map

    for i, row in enumerate(expert_map(d["expert_types"], d["expert_pruned"])):
        yield f"  blk.{i}: " + ", ".join(f"{label} x{n}" for label, n in row)


def _full_map(d):
    from meldlite.modelinfo import expert_label

    pop, sens = d.get("expert_popularity"), d.get("expert_sensitivity")
    for i, layer in enumerate(d["expert_types"]):
        yield f"  blk.{i}:"
        pruned = set(d["expert_pruned"][i]) if d["expert_pruned"] else set()
        for e, t in enumerate(layer):
            extra = "  pruned" if e in pruned else ""
            if pop:
                extra += f"  popularity {pop[i][e]:.4f}"
            if sens:
                extra += f"  sensitivity {sens[i][e]:.2e}"
            label = "-" if t[0] == "pruned" else expert_label(t)  # tensors left out
            yield f"    {e:>4} {label}{extra}"
