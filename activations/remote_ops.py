"""The only afprobe code that runs inside a remote (NDIF) trace.

nnsight ships these functions by value (`nnsight.register`, source and all), so the server, which has no afprobe,
rebuilds them from their source. They may use only what the server allows: torch, math, einops, collections,
typing, operator (`activations/remote.py: ALLOWED_MODULES`, checked on every serialized trace). Each mirrors the
local code exactly (`backends/base.py: pool, project_out, ResidualEdit.steer`; `backends/nnsight_backend.py:
_apply_edit`; the log-odds sum of `steering.py`), so the remote path computes the same numbers (tested with
`remote: local`). No type annotations: they would be shipped too.

An edit crosses as a plain dict: {"layers": tuple of block indices, "add": [b, d] float32 or None, "mask": [b, t]
or None (1 where the prompt pass adds), "ablate": [d] unit float32 or None, "site": "resid_pre" | "resid_mid" |
"resid_post"}; `names` gives the block's submodule names {"attn", "attn_out", "mlp", "mid"} for the model family.
"""
import torch


def first(output):
    return output[0] if isinstance(output, tuple) else output


def with_first(output, value):
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


def pool(weights, hidden):
    """weights [b, k, t], hidden [b, t, d] -> [b, k, d] float32 (pooled on the server: only this comes back)."""
    return torch.einsum("bkt,btd->bkd", weights.to(hidden.device, torch.float32), hidden.float())


def steer(hidden, add, mask):
    """hidden [b, t, d] plus add [b, d] (masked by mask [b, t] on the prompt pass), summed in float32."""
    delta = add.to(hidden.device, torch.float32)[:, None, :]
    if mask is not None and mask.shape[1] == hidden.shape[1]:
        delta = delta * mask.to(hidden.device, torch.float32)[:, :, None]
    return (hidden.float() + delta).to(hidden.dtype)


def project_out(hidden, unit):
    u = unit.to(hidden.device, torch.float32)
    h = hidden.float()
    return (h - (h @ u)[..., None] * u).to(hidden.dtype)


def site_value(block, site, names):
    """The residual stream at `site` of a traced block."""
    if site == "resid_pre":
        return block.input
    if site == "resid_mid":
        return getattr(block, names["mid"]).input
    return first(block.output)


def apply_edit(blocks, names, edit):
    """Steering and/or ablation on a traced forward, in module order (as the local nnsight backend does)."""
    add_layers = set(edit["layers"]) if edit["add"] is not None else set()
    top = max(add_layers) if edit["ablate"] is None else len(blocks) - 1
    for i in range(top + 1):
        block = blocks[i]
        adding = i in add_layers
        if edit["ablate"] is not None:
            block.input = project_out(block.input, edit["ablate"])
        if adding and edit["site"] == "resid_pre":
            block.input = steer(block.input, edit["add"], edit["mask"])
        if edit["ablate"] is not None:
            attn = getattr(block, names["attn"])
            attn.output = with_first(attn.output, project_out(first(attn.output), edit["ablate"]))
        if adding and edit["site"] == "resid_mid":
            out = getattr(block, names["attn_out"])
            out.output = with_first(out.output, steer(first(out.output), edit["add"], edit["mask"]))
        if edit["ablate"] is not None:
            mlp = getattr(block, names["mlp"])
            mlp.output = project_out(mlp.output, edit["ablate"])
        if adding and edit["site"] == "resid_post":
            block.output = with_first(block.output, steer(first(block.output), edit["add"], edit["mask"]))


def tag_logps(logits, cols, tokens, valid):
    """Teacher-forced log P(tag) per row: logits [b, t, vocab]; cols, tokens, valid [b, m] (the column predicting
    each tag token, the token, 1 for real tag tokens) -> [b] float32. Only these [b] numbers come back."""
    picked = logits.gather(1, cols.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1]))
    logp = torch.log_softmax(picked.float(), dim=-1).gather(-1, tokens.to(logits.device)[:, :, None])[..., 0]
    return (logp * valid.to(logp.device, torch.float32)).sum(-1)
