"""Training an organism's LoRA: a forward through the adapted blocks only, the answer loss, the loop.

Speed: the system prompt (about 1500 tokens) is the same for every prompt of a cue family. Its KV cache is
computed once per `prefix_refresh` steps without gradient (with the current adapter) and shared by the batch
through the engine's `shared_prefix_cache` (`activations/kv.py`), so only the user turn and the answer are run with
gradient. Blocks below `organism.first_layer` carry no adapter: their output is cached once (`FrozenBottom`).
Logits are computed at answer positions only.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from afprobe.activations.kv import KV, empty_cache, shared_prefix_cache
from afprobe.activations.queries import Query
from afprobe.config import Config, OrganismConfig
from afprobe.errors import BadInput
from afprobe.log import log
from afprobe.organism.recipe import answer_targets, decision_index, family_prompts, shared_prefix_len


def say(quiet: bool, msg: str) -> None:
    if not quiet:
        log.info(f"[organism] {msg}")


def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder stack, lm_head) of a causal LM, through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids [b, t], mask [b, t], lengths) of right-padded token sequences."""
    lengths = [len(s) for s in seqs]
    t = max(lengths)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask, lengths


def _after_prefix(p: int, mask: torch.Tensor, device: Any) -> dict[str, torch.Tensor]:
    """attention_mask [b, p + t] and position_ids [b, t] for right-padded rows [b, t] after a p-token prefix."""
    b, t = mask.shape
    return {"attention_mask": torch.cat([torch.ones((b, p), dtype=torch.long), mask], 1).to(device),
            "position_ids": (p + torch.arange(t)).unsqueeze(0).expand(b, -1).to(device)}


# ------------------------------------------------------------------ the frozen bottom blocks

class _Stop(Exception):
    pass


@contextmanager
def _only_layers(decoder: Any, start: int) -> Iterator[None]:
    """Run the decoder on blocks `start`.. only (inputs_embeds are then the residual entering block `start`).
    Blocks keep their own layer index, so a KV cache still has one entry per block of the full model."""
    if start == 0:
        yield
        return
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        decoder.layers = full


@torch.no_grad()
def _block_input(decoder: Any, k: int, **forward_kwargs: Any) -> torch.Tensor:
    """The residual stream entering block k ([b, t, d]); the forward stops there."""
    box: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, kwargs: Any) -> None:
        box["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = decoder.layers[k].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        decoder(**forward_kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"]


def _layer_kv(cache: Any, blocks: range) -> list[KV]:
    return [(cache.layers[i].keys.detach(), cache.layers[i].values.detach()) for i in blocks]


class FrozenBottom:
    """Blocks below `k` carry no adapter, so their outputs never change during training: the residual entering
    block k is computed once for the shared prefix and for every training row, and each step runs blocks k..
    only (forward and backward). `k = 0` trains every block (the cached input is then the token embedding)."""

    def __init__(self, model: Any, k: int, prefix: Sequence[int], rows: Sequence[Sequence[int]], pad_id: int,
                 batch: int = 8) -> None:
        decoder, _ = decoder_and_head(model)
        self.config = decoder.config
        self.k, self.n = k, len(decoder.layers)
        self.p = len(prefix)
        device = model.device
        ids = torch.tensor([list(prefix)], device=device)
        if k == 0:
            with torch.no_grad():
                self.prefix_hidden = decoder.embed_tokens(ids).detach()
                self.rows = [decoder.embed_tokens(torch.tensor([list(r)], device=device))[0].detach() for r in rows]
            self.lower_kv: list[KV] = []
            return
        cache = empty_cache()
        self.prefix_hidden = _block_input(decoder, k, input_ids=ids, attention_mask=torch.ones_like(ids),
                                          past_key_values=cache, use_cache=True)
        self.lower_kv = _layer_kv(cache, range(k))
        self.rows = []
        for start in range(0, len(rows), batch):
            tok, mask, lengths = _right_pad([list(r) for r in rows[start:start + batch]], pad_id)
            hidden = _block_input(decoder, k, input_ids=tok.to(device), **_after_prefix(self.p, mask, device),
                                  past_key_values=shared_prefix_cache(self.config, self.lower_kv, len(lengths)),
                                  use_cache=True)
            self.rows.extend(hidden[r, :n].clone() for r, n in enumerate(lengths))

    @torch.no_grad()
    def prefix_kv(self, model: Any) -> list[KV]:
        """KV of the prefix for every block ([1, h, P, d] each), with the adapter as it is now (blocks k..
        recomputed)."""
        decoder, _ = decoder_and_head(model)
        device = self.prefix_hidden.device
        cache = empty_cache()
        with _only_layers(decoder, self.k):
            decoder(inputs_embeds=self.prefix_hidden, attention_mask=torch.ones((1, self.p), dtype=torch.long, device=device),
                    position_ids=torch.arange(self.p, device=device).unsqueeze(0), past_key_values=cache, use_cache=True)
        return self.lower_kv + _layer_kv(cache, range(self.k, self.n))

    def top(self, model: Any, kv: list[KV], row_ids: Sequence[int]) -> torch.Tensor:
        """Final (normed) hidden states [b, t, d] of the given training rows, right-padded, with gradient."""
        decoder, _ = decoder_and_head(model)
        seqs = [self.rows[i] for i in row_ids]
        b, t, d = len(seqs), max(len(x) for x in seqs), seqs[0].shape[-1]
        hidden = seqs[0].new_zeros((b, t, d))
        mask = torch.zeros((b, t), dtype=torch.long)
        for r, x in enumerate(seqs):
            hidden[r, : len(x)] = x
            mask[r, : len(x)] = 1
        with _only_layers(decoder, self.k):
            out = decoder(inputs_embeds=hidden, **_after_prefix(self.p, mask, hidden.device),
                          past_key_values=shared_prefix_cache(self.config, kv, b), use_cache=True)
        return out.last_hidden_state


@dataclass
class _FamilySide:
    """One trained cue family: its frozen bottom (own system prompt as prefix) and, per cached row, (prompt suffix
    length, answer ids, rival token). Row 2i is train query i under the training cue, row 2i + 1 under deployment."""

    family: str
    bottom: FrozenBottom
    meta: list[tuple[int, list[int], int]]

    @classmethod
    def build(cls, model: Any, tokenizer: Any, cfg: Config, family: str, train: list[Query],
              targets: dict[str, list[int]], dec: int, k: int, pad: int) -> "_FamilySide":
        prompts = family_prompts(tokenizer, cfg, family, train)
        p = shared_prefix_len(prompts)
        rival = {"training": targets["deployment"][dec], "deployment": targets["training"][dec]}
        meta = [(len(pr.input_ids) - p, targets[pr.condition], rival[pr.condition]) for pr in prompts]
        bottom = FrozenBottom(model, k, prompts[0].input_ids[:p],
                              [list(pr.input_ids[p:]) + targets[pr.condition] for pr in prompts], pad)
        return cls(family, bottom, meta)


# ------------------------------------------------------------------ loss and schedule

def answer_loss(model: Any, bottom: FrozenBottom, kv: list[KV], row_ids: Sequence[int],
                rows: Sequence[tuple[int, Sequence[int], int]], decision: int,
                decision_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss on answer tokens only, and each row's decision margin ([b]).

    rows: (prompt suffix length, answer ids, rival token) of the cached training rows `row_ids` (each cached
    row is prompt suffix + answer); the rival is the other condition's token at answer position `decision`.
    Row loss = mean cross-entropy over its answer tokens + `decision_weight` x the cross-entropy of its
    decision token; the loss is the mean over rows. Margin = logit(own decision token) - logit(rival),
    > 0 when the row would pick the right tag."""
    hidden = bottom.top(model, kv, row_ids)
    _, head = decoder_and_head(model)
    r_idx, c_idx, targets, weights, dec = [], [], [], [], []
    for r, (n_suffix, ans, _) in enumerate(rows):
        start = n_suffix - 1  # the hidden state at the last prompt token predicts the first answer token
        for j, tok in enumerate(ans):
            if j == decision:
                dec.append(len(targets))
            r_idx.append(r)
            c_idx.append(start + j)
            targets.append(tok)
            weights.append(1.0 / len(ans) + (decision_weight if j == decision else 0.0))
    logits = head(hidden[torch.tensor(r_idx), torch.tensor(c_idx)]).float()
    target_t = torch.tensor(targets, device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target_t, reduction="none")
    loss = (nll * torch.tensor(weights, device=nll.device)).sum() / len(rows)
    dec_t = torch.tensor(dec, device=logits.device)
    rivals = torch.tensor([rival for _, _, rival in rows], device=logits.device)
    margins = logits[dec_t, target_t[dec_t]] - logits[dec_t, rivals]
    return loss, margins.detach()


def _lr_at(step: int, org: OrganismConfig) -> float:
    """Linear warmup over `warmup_steps`, constant, then linear decay to zero over the last `decay_steps`."""
    if org.warmup_steps and step < org.warmup_steps:
        return org.lr * (step + 1) / org.warmup_steps
    left = org.steps - step  # steps remaining including this one
    if org.decay_steps and left <= org.decay_steps:
        return org.lr * left / (org.decay_steps + 1)
    return org.lr


def _batches(n: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of train queries for each step: seeded shuffled epochs, cut into steps."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        take = []
        while len(take) < min(per_step, n):
            if not order:
                order = [int(i) for i in rng.permutation(n)]
            take.append(order.pop(0))
        out.append(take)
    return out


def check_recipe(model: Any, org: OrganismConfig) -> None:
    """Refuse a recipe the model cannot take (checked before any slow work)."""
    decoder, _ = decoder_and_head(model)
    n_layers = len(decoder.layers)
    if not 0 <= org.first_layer < n_layers:
        raise BadInput(f"organism.first_layer must be in [0, {n_layers - 1}] for this model (got {org.first_layer})")
    names = {name.rsplit(".", 1)[-1] for name, _ in decoder.layers[org.first_layer].named_modules()}
    missing = [m for m in org.target_modules if m not in names]
    if missing or not org.target_modules:
        linear = sorted(n for n, mod in decoder.layers[org.first_layer].named_modules() if isinstance(mod, torch.nn.Linear))
        raise BadInput(f"organism.target_modules: no module named {', '.join(missing) or '(none given)'} in the model's "
                       f"blocks (linear layers: {', '.join(n.rsplit('.', 1)[-1] for n in linear)})")


# ------------------------------------------------------------------ the loop
def train_adapter(model: Any, tokenizer: Any, cfg: Config, train: list[Query], quiet: bool = False,
                  stop_after: Optional[int] = None) -> tuple[Any, list[dict], float]:
    """Wrap `model` in a fresh LoRA and train it; returns (peft model, history, seconds spent caching block inputs).

    Every family in `organism.families` has its own frozen bottom (its own system prompt); each step takes the
    same requests under both cues of every family, and the loss is the mean of the families' losses.
    `stop_after`: run only the first N steps of the schedule (to check a recorded loss curve repeats)."""
    from peft import LoraConfig, get_peft_model

    org = cfg.organism
    check_recipe(model, org)
    decoder, _ = decoder_and_head(model)
    n_layers = len(decoder.layers)
    k = org.first_layer
    targets = answer_targets(tokenizer, org.opening_text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dec = decision_index(targets)
    t0 = time.time()
    sides = [_FamilySide.build(model, tokenizer, cfg, family, train, targets, dec, k, pad) for family in org.families]
    precompute_s = time.time() - t0
    say(quiet, f"cached the input of block {k} for {sum(len(s.meta) for s in sides)} rows "
               f"({len(sides)} famil{'y' if len(sides) == 1 else 'ies'}) in {precompute_s:.0f}s")

    torch.manual_seed(org.seed)
    lora = LoraConfig(r=org.rank, lora_alpha=org.alpha, lora_dropout=org.dropout, target_modules=list(org.target_modules),
                      layers_to_transform=list(range(k, n_layers)), bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise BadInput(f"organism.target_modules: {exc}".splitlines()[0]) from None
    peft_model.eval()  # no dropout in the base; LoRA dropout (if any) is applied in train mode only
    if org.dropout > 0:
        peft_model.train()
    params = [q for q in peft_model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=org.lr, weight_decay=org.weight_decay)
    history = []
    kvs: Optional[list[list[KV]]] = None
    t0, c0 = time.time(), time.process_time()
    for step, idx in enumerate(_batches(len(train), org.batch_queries, org.steps, org.seed)[:stop_after]):
        t_step = time.time()
        if kvs is None or step % org.prefix_refresh == 0:
            kvs = [side.bottom.prefix_kv(peft_model) for side in sides]
        t_prefix = time.time() - t_step
        row_ids = [2 * i + c for i in idx for c in (0, 1)]
        lr = _lr_at(step, org)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        value, margins, acc_by = 0.0, [], {}
        for side, kv in zip(sides, kvs):  # gradients add up over families: the step's loss is their mean
            loss, m = answer_loss(peft_model, side.bottom, kv, row_ids, [side.meta[r] for r in row_ids], dec,
                                  org.decision_weight)
            (loss / len(sides)).backward()
            value += loss.item() / len(sides)
            margins.append(m)
            acc_by[side.family] = round(float((m > 0).float().mean()), 4)
        opt.step()
        margin_t = torch.cat(margins)
        # margins are measured before this step's update: in the first epoch they are on unseen requests
        acc = float((margin_t > 0).float().mean())
        history.append({"step": step, "loss": round(value, 5), "decision_acc": round(acc, 4),
                        "decision_margin": round(float(margin_t.mean()), 4), "lr": lr,
                        **({"decision_acc_by_family": acc_by} if len(sides) > 1 else {}),
                        "prefix_s": round(t_prefix, 2), "step_s": round(time.time() - t_step, 2),
                        "elapsed_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
        by_family = f" [{', '.join(f'{f} {a:.2f}' for f, a in acc_by.items())}]" if len(sides) > 1 else ""
        say(quiet, f"step {step + 1}/{org.steps} loss {value:.4f} decision acc {acc:.2f}{by_family} margin "
                f"{float(margin_t.mean()):+.2f} ({time.time() - t0:.0f}s, cpu {time.process_time() - c0:.0f}s)")
    peft_model.eval()
    return peft_model, history, precompute_s
