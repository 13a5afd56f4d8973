"""The next-token loss, from full logits or from hidden states at the supervised positions only.

`causal_lm_loss` is the reference: logits for every position, shifted, cross entropy in float32. Training needs far
less: image tokens and prompts carry no label, yet the LM head (a 151k-row matrix for Qwen2-based models) is the
largest matmul of a small model's step, and its float32 logits are copied several times for every position.
`supervised_lm_loss` takes the decoder's last hidden states instead, keeps the rows whose next token is supervised,
and runs the LM head and the cross entropy over them in chunks of at most `CHUNK_BYTES` of float32 logits:

* a plain `nn.Linear` head: `_ChunkedLinearCrossEntropy` computes each chunk's loss and its gradients for the
  hidden states, the weight and the bias during the forward pass (the gradient of a scalar loss is linear in the
  incoming gradient, so backward only scales them) — no logits are kept for backward and none is recomputed;
* with `liger-kernel` installed and the head on a GPU: its fused linear cross entropy, once per distinct token weight;
* any other head (peft LoRA on the head, a 4-bit layer, a DeepSpeed ZeRO-3 partitioned weight that only exists
  inside the module's own forward): the module itself per chunk under activation checkpointing. A ZeRO-3 head runs
  as many chunks on every rank (the most any rank has; empty ones past a rank's rows): each call is a collective.

Both functions compute `sum(ce * w) / sum(w)` over supervised tokens with the same weights (`_token_weights`), so
the token / sample / square reductions and the rank-averaged denominator mean the same in both.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..constants import IGNORE_INDEX

CHUNK_BYTES = 128 * 2**20  # float32 logits held at once per chunk (151,674-token vocabulary: 221 rows)
_MIN_CHUNK_ROWS = 16


def _token_weights(
    next_labels: torch.Tensor, next_weight: torch.Tensor | None, all_reduce_denominator: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position weight (0 where the next token is unsupervised), flattened, and the loss denominator.

    `next_labels` / `next_weight` hold, at position t, the label and loss weight of token t+1 (what t predicts).
    """
    supervised = (next_labels.reshape(-1) != IGNORE_INDEX).to(device, torch.float32)
    if next_weight is None:
        weight = supervised
    else:
        weight = next_weight.to(device, torch.float32).reshape(-1) * supervised
    denom = weight.sum()
    if all_reduce_denominator and dist.is_available() and dist.is_initialized():
        denom = denom.detach().clone()
        dist.all_reduce(denom, op=dist.ReduceOp.SUM)
        denom = denom / dist.get_world_size()
    return weight, denom.clamp(min=1e-8)  # no supervised token: numerator and loss are 0, no host sync


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_weight: torch.Tensor | None = None,
    all_reduce_denominator: bool = False,
) -> torch.Tensor:
    """Next-token cross entropy in float32 from logits of every position.

    Without `loss_weight`: mean over supervised tokens. With it: `sum(ce * w) / sum(w)` over supervised tokens,
    `w` given per input position (the weight of position t applies to predicting token t from t-1), which is how
    the token / sample / square reductions are expressed. `all_reduce_denominator` averages `sum(w)` over ranks so
    every rank's gradient has the same scale. A batch with no supervised token gives a zero loss that still keeps
    the graph connected.
    """
    # the labels move one step left (the last position predicts nothing): a view of the logits, not a copy
    next_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    next_weight = F.pad(loss_weight[..., 1:], (0, 1)) if loss_weight is not None else None
    logits = logits.float()
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        next_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    weight, denom = _token_weights(next_labels, next_weight, all_reduce_denominator, ce.device)
    return (ce * weight).sum() / denom


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's float32 logits stay within `CHUNK_BYTES`."""
    return max(_MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(vocab_size, 1)))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """`sum_i scale_i * CE(h_i @ W.T + b, t_i)` with the gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows]
            t = targets[start:start + rows]
            s = scale[start:start + rows]
            logits = F.linear(h, weight, bias).float()  # the dtype the reference sees: the head's, then float32
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * s).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = scale * (softmax - one_hot), built in place over the chunk's logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), t] -= 1.0
            grad.mul_(s[:, None])
            grad_low = grad.to(weight.dtype)
            if need_h:
                grad_hidden[start:start + rows] = (grad_low @ weight).to(hidden.dtype)
            if need_w:
                if grad_low.dtype == torch.float32:  # accumulate in place: no [vocabulary, hidden] temporary
                    grad_weight.addmm_(grad_low.t(), h.float())
                else:
                    grad_weight += (grad_low.t() @ h.to(weight.dtype)).float()
            if need_b:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: the buffers are ours alone and a second copy of a [vocabulary, hidden] gradient would
        # raise the step's peak memory (a second backward through this graph fails on the version check instead)
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(w_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss).to(b_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _plain_linear(head: nn.Module) -> bool:
    """An `nn.Linear` whose weight is usable outside its own forward (no hooks, not ZeRO-3 partitioned)."""
    return (
        type(head) is nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and not hasattr(head.weight, "ds_id")
    )


def _liger_usable(head: nn.Module, hidden: torch.Tensor) -> bool:
    return hidden.is_cuda and _plain_linear(head) and importlib.util.find_spec("liger_kernel") is not None


def _liger_loss(head: nn.Linear, hidden, targets, scale) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    loss = hidden.new_zeros((), dtype=torch.float32)
    for value in torch.unique(scale):  # a sum per distinct weight: one per sample at most
        rows = scale == value
        part = fused(head.weight, hidden[rows], targets[rows], head.bias)
        part = part[0] if isinstance(part, tuple) else part
        loss = loss + part.float() * value
    return loss


def _module_chunk_loss(head: nn.Module, hidden, targets, scale, rows, calls: int | None = None) -> torch.Tensor:
    """The head module per chunk of `rows` under checkpointing; `calls` chunks when given (past this rank's rows an
    empty one: the head still runs)."""
    def chunk_loss(h, t, s):
        logits = head(h).float()
        return (F.cross_entropy(logits, t, reduction="none") * s).sum()

    loss = hidden.new_zeros((), dtype=torch.float32)
    for i in range(-(-hidden.shape[0] // rows) if calls is None else calls):
        part = slice(i * rows, (i + 1) * rows)
        loss = loss + checkpoint(chunk_loss, hidden[part], targets[part], scale[part], use_reentrant=False)
    return loss


def _zero3_partitioned(head: nn.Module) -> bool:
    """A head with DeepSpeed ZeRO-3 partitioned weights: every call gathers them from all ranks (a collective)."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _chunks_on_every_rank(chunks: int, device) -> int:
    """The most chunks any rank has this step. Ranks that call a ZeRO-3 head unequally often (more supervised tokens
    on one, none on another) issue unequal gathers and wait on each other forever, so every rank runs this many."""
    if not (dist.is_available() and dist.is_initialized()):
        return chunks
    count = torch.tensor([chunks], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def supervised_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    loss_weight: torch.Tensor | None = None,
    all_reduce_denominator: bool = False,
    rows: int | None = None,
) -> torch.Tensor:
    """`causal_lm_loss(head(hidden_states), labels, ...)` without the logits of unsupervised positions.

    `hidden_states` are the decoder's last (normed) hidden states, `[..., seq, hidden]` like `labels` `[..., seq]`;
    `head` is the LM head module. `rows` overrides the chunk size (tests). Same value and gradients as the
    reference within float32 rounding, for every reduction.
    """
    next_labels = labels[..., 1:].to(hidden_states.device)
    next_weight = loss_weight[..., 1:] if loss_weight is not None else None
    weight, denom = _token_weights(next_labels, next_weight, all_reduce_denominator, hidden_states.device)
    keep = weight != 0
    flat = hidden_states[..., :-1, :].reshape(-1, hidden_states.shape[-1])
    hidden, targets, scale = flat[keep], next_labels.reshape(-1)[keep], weight[keep] / denom
    if _zero3_partitioned(head):  # the same number of head calls on every rank
        rows = rows or chunk_rows(_out_features(head))
        calls = _chunks_on_every_rank(-(-hidden.shape[0] // rows), hidden_states.device)
        loss = _module_chunk_loss(head, hidden, targets, scale, rows, calls)
        return loss + hidden_states.sum().float() * 0.0 if hidden.shape[0] == 0 else loss
    if hidden.shape[0] == 0:  # nothing supervised: a zero that keeps the graph connected
        return hidden_states.sum().float() * 0.0
    if _liger_usable(head, hidden):
        return _liger_loss(head, hidden, targets, scale)
    rows = rows or chunk_rows(getattr(head, "out_features", 0) or _out_features(head))
    if _plain_linear(head):
        tensors = (hidden, head.weight, head.bias)
        if not torch.is_grad_enabled():  # e.g. an eval loss: detached, so no gradient is computed in the forward
            tensors = tuple(t.detach() if t is not None else None for t in tensors)
        return _ChunkedLinearCrossEntropy.apply(*tensors, targets, scale, rows)
    return _module_chunk_loss(head, hidden, targets, scale, rows)


def _out_features(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)  # ZeRO-3 keeps the full shape aside
    return int(shape[0]) if shape else 0
