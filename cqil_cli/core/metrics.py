"""The quality metrics, defined once: next-token NLL, perplexity, KL divergence, top-1 agreement.

Used by analyze (sensitivity), convert (search re-measurement, held-out perplexity), tuning (the
distillation loss) and bench (quality against a baseline). All take logits or log-probabilities
over the last dimension (V, the vocabulary) and compute in fp32.

KL is KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) with p the reference (original model, baseline,
teacher) and q the model under test; "per token" means averaged over predicted positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# exp() of a mean NLL above this overflows a float; perplexity is then reported as exp(700).
_MAX_NLL = 700.0


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [..., V] log-probabilities in fp32."""
    return F.log_softmax(logits.float(), dim=-1)


def token_nll(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probabilities, [...] target ids -> [...] negative log-likelihood."""
    return -log_p.gather(-1, targets[..., None].to(log_p.device)).squeeze(-1)


def next_token_nll(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, V] log-probabilities of a forward over ids [B, T] -> [B, T-1] NLL of each next
    token (position t predicts ids[:, t+1])."""
    return token_nll(log_p[:, :-1], ids[:, 1:])


def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probabilities of the reference p and the model q -> [...] KL(p ‖ q).
    Differentiable in log_q (the tuning loss)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(reference ‖ model) of two [..., V] logits (a scalar tensor)."""
    return token_kl(log_probs(reference_logits), log_probs(logits)).mean()


# Rows of logits per chunk in mean_kl_of_hidden: about 8M fp32 values (32 MB) per temporary,
# e.g. 170 rows of a 49k vocabulary, 64 of a 128k one.
_CHUNK_VALUES = 1 << 23


class _ChunkedKL(torch.autograd.Function):
    """Mean KL(head(reference) ‖ head(hidden)) over rows, and its gradient in `hidden`, a chunk
    of rows at a time: no [N, V] tensor ever exists. The gradient is computed in the forward
    (one head forward + backward per chunk, what an unchunked loss costs) and kept, [N, d]; the
    backward only scales it."""

    @staticmethod
    def forward(ctx, reference, hidden, head, rows):  # [N, d], [N, d] -> scalar
        grad = torch.empty_like(hidden)  # d(Σ KL)/d hidden [N, d]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            with torch.no_grad():
                log_p = log_probs(head(reference[start:start + rows]))  # [rows, V]
            with torch.enable_grad():
                part = hidden[start:start + rows].detach().requires_grad_(True)
                kl = token_kl(log_p, log_probs(head(part))).sum()
                grad[start:start + rows] = torch.autograd.grad(kl, part)[0]
            total += kl.detach().double()
        ctx.save_for_backward(grad)
        ctx.rows_total = hidden.shape[0]
        return (total / hidden.shape[0]).float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return None, grad * (grad_output / ctx.rows_total).to(grad.dtype), None, None


def mean_kl_of_hidden(reference_hidden: torch.Tensor, hidden: torch.Tensor, head) -> torch.Tensor:
    """mean_kl(head(reference_hidden), head(hidden)), differentiable in `hidden`, in chunks of
    rows: [..., d] hidden states (after the final norm) of the reference and of the model, and
    head: [rows, d] -> [rows, V] logits. The tuning loss: a [4, 256, 49k] pair of logits with
    their log-probabilities and gradients would take 1-2 GB at once. The head's own parameters
    get no gradient (tuning never trains the head or the final norm)."""
    d = hidden.shape[-1]
    reference, flat = reference_hidden.reshape(-1, d), hidden.reshape(-1, d)
    with torch.no_grad():
        probe = head(flat[:1])  # [1, V]: the vocabulary size, for the chunk size
    rows = max(1, _CHUNK_VALUES // probe.shape[-1])
    return _ChunkedKL.apply(reference, flat, head, rows)


def summed_kl(reference_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 64,
              head=None) -> float:
    """Σ over positions of KL(reference ‖ model) of two [..., V] logits, in float64, `chunk`
    rows at a time: the fp32 temporaries stay chunk × V (a [4, 256, 128k] pair of logits would
    otherwise need about 2 GB of fp32 log-probabilities). With `head` ([rows, d] -> [rows, V]),
    the two are final-normed hidden states [..., d] instead, turned into logits a chunk at a
    time: no [..., V] tensor exists at all."""
    width = logits.shape[-1]
    ref, flat = reference_logits.reshape(-1, width), logits.reshape(-1, width)
    head = head if head is not None else (lambda rows: rows)
    total = 0.0
    for start in range(0, flat.shape[0], chunk):
        kl = token_kl(log_probs(head(ref[start:start + chunk])),
                      log_probs(head(flat[start:start + chunk])))
        total += float(kl.sum(dtype=torch.float64))
    return total


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), capped instead of overflowing."""
    return math.exp(min(mean_nll, _MAX_NLL))


class TokenMetrics:
    """Running sums of next-token metrics of a model, and against a reference, per token.

    `update(reference_logits, logits, targets)` takes [B, T, V] logits at the positions that
    predict `targets` [B, T] (reference_logits None: the reference itself, KL 0 and agreement
    1); sums are float64, so the order of batches does not matter. Work is done in chunks of
    rows, so temporaries stay at chunk × V fp32 whatever the batch.
    """

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.tokens = 0

    @torch.no_grad()
    def update(self, reference_logits: torch.Tensor | None, logits: torch.Tensor,
               targets: torch.Tensor, chunk: int = 64) -> None:
        V = logits.shape[-1]
        if reference_logits is not None and reference_logits.shape[-1] != V:
            raise ValueError(f"the model predicts {V} tokens but the reference "
                             f"{reference_logits.shape[-1]}: their vocabularies differ")
        flat = logits.reshape(-1, V)
        ref_flat = reference_logits.reshape(-1, V) if reference_logits is not None else None
        tgt = targets.reshape(-1).to(flat.device)
        for start in range(0, flat.shape[0], chunk):
            lq = log_probs(flat[start:start + chunk])
            self.nll += float(token_nll(lq, tgt[start:start + chunk]).sum(dtype=torch.float64))
            if ref_flat is None:
                self.agree += lq.shape[0]
            else:
                lp = log_probs(ref_flat[start:start + chunk].to(lq.device))
                self.kl += float(token_kl(lp, lq).sum(dtype=torch.float64))
                self.agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            self.tokens += lq.shape[0]

    @property
    def mean_nll(self) -> float:
        return self.nll / max(self.tokens, 1)

    def result(self) -> dict:
        n = max(self.tokens, 1)
        return {"ppl": perplexity_of(self.mean_nll), "nll": self.mean_nll,
                "kl": max(self.kl / n, 0.0), "top1_agreement": self.agree / n,
                "tokens": self.tokens}
