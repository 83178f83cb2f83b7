"""`GPT2CodePrior` (registered network ``gpt2_code_prior``): a GPT2 decoder over VQGAN code indices
conditioned on a prefix of text features ("Diverse and Vivid Sound Generation from Text
Descriptions", Sec. 2.3, eqs. 5-6).

The sequence the decoder reads is ``[text prefix (P positions), s_1, ..., s_{N-1}]``: the text
features ``(B, P, D_text)`` are projected to the GPT2 width and placed before the code embeddings;
output ``P - 1 + i`` predicts code ``s_{i+1}`` from the prefix and ``s_{<=i}`` (as SpecVQGAN's
feature-conditioned GPT). The loss is the cross-entropy of the ``N`` code positions only:
``-log p(s | F_text) = -sum_i log p(s_i | s_{<i}, F_text)`` averaged over codes (eq. 6). Padded
prefix slots (a text shorter than ``P`` tokens) are masked out of attention.

Sampling (`sample`) draws codes one by one with the key/value cache, so each step runs the decoder
on one new position (cost linear in the length; ``use_cache=False`` recomputes the whole sequence
every step and gives the same codes). Each step's logits go through `next_codes`: temperature,
top-k (exactly ``k`` codes kept), top-p (the smallest set of codes of mass >= ``p``), or greedy
argmax. Optional classifier-free guidance (beyond the paper, off unless ``cfg_dropout > 0``): a
learned "no text" prefix replaces the text of a random fraction of the training rows, and sampling
mixes log-probabilities ``uncond + guidance * (cond - uncond)``. Draws use the given CPU
`torch.Generator`\\ s, one per row (rows may share one), on CPU float32 probabilities, so a seed
gives the same codes whatever the device and whatever else is in the batch.

``transformers`` is imported when the network is built, not at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tta.registry import register

log = logging.getLogger(__name__)

__all__ = ["GPT2CodePrior", "filter_logits", "next_codes"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits (B, V)`` with every code outside the top ``k`` and outside the nucleus of mass ``p``
    set to ``-inf``. Exactly ``min(k, V)`` codes survive top-k (ties broken by `torch.topk`); top-p
    keeps the most probable codes up to and including the one whose cumulative probability reaches
    ``p`` (at least one code). None: no filter."""
    if logits.dim() != 2:
        raise ValueError(f"filter_logits expects (B, V) logits, got {tuple(logits.shape)}")
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k < logits.shape[-1]:
            keep = torch.zeros_like(logits, dtype=torch.bool)
            keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
            logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
            drop_sorted = mass_before >= top_p  # the first code always stays (its mass before is 0)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _per_row(generator: Generators, rows: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * rows
    gens = list(generator)
    if len(gens) != rows:
        raise ValueError(f"{len(gens)} generators given for {rows} rows (one per row, or one for all)")
    return gens


def next_codes(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, greedy: bool = False, generator: Generators = None) -> torch.Tensor:
    """One code per row of ``logits (B, V)``: the argmax with ``greedy``, else a draw from
    ``softmax(filter_logits(logits / temperature))`` made on the CPU in float32, row by row, each
    row with its generator (``generator``: one for all rows, one per row, or None: torch's global
    CPU generator). Returns ``(B,)`` long on the device of ``logits``."""
    if greedy:
        return logits.argmax(dim=-1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = filter_logits(logits.detach().float().cpu() / temperature, top_k, top_p).softmax(-1)
    gens = _per_row(generator, probs.shape[0])
    out = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, gens, strict=True)])
    return out.to(logits.device)


def _cache_of(output: Any) -> Any:
    """The key/value cache of a GPT2 output (``cache`` in transformers >= 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@register("network", "gpt2_code_prior")
class GPT2CodePrior(nn.Module):
    """GPT2 over code indices with a projected text-feature prefix (see the module docstring).

    Args:
        num_codes: codebook size ``|Z|`` (the vocabulary; 1024 in the paper); the head is
            ``num_codes``-way.
        max_codes: longest code sequence (the training segment's grid, e.g. 5 x 50 = 250).
        feature_dim: width ``D_text`` of the text features.
        prefix_length: prefix positions ``P`` (30 for "30 Feats", 1 for "1 Feat" / "No Feat").
        n_embd, n_layer, n_head: GPT2 width, depth, heads (paper: hidden 1024; SpecVQGAN: 24
            layers, 16 heads).
        dropout: GPT2's embedding, residual and attention dropout (SpecVQGAN: 0).
        cfg_dropout: probability that a training row's text prefix is replaced by the learned
            ``null_prefix`` (classifier-free guidance; 0: no null prefix, no guidance).
        activation: GPT2's MLP activation (``gelu_new``, GPT2's own).
    """

    def __init__(
        self,
        num_codes: int = 1024,
        max_codes: int = 250,
        feature_dim: int = 768,
        prefix_length: int = 30,
        n_embd: int = 1024,
        n_layer: int = 24,
        n_head: int = 16,
        dropout: float = 0.0,
        cfg_dropout: float = 0.0,
        activation: str = "gelu_new",
    ) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        for name, value in (("num_codes", num_codes), ("max_codes", max_codes), ("feature_dim", feature_dim),
                            ("prefix_length", prefix_length), ("n_embd", n_embd), ("n_layer", n_layer),
                            ("n_head", n_head)):
            if int(value) < 1:
                raise ValueError(f"GPT2CodePrior: {name} must be >= 1, got {value}")
        if n_embd % n_head:
            raise ValueError(f"GPT2CodePrior: n_embd {n_embd} is not divisible by n_head {n_head}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"GPT2CodePrior: cfg_dropout must be in [0, 1), got {cfg_dropout}")
        self.num_codes, self.max_codes = int(num_codes), int(max_codes)
        self.feature_dim, self.prefix_length = int(feature_dim), int(prefix_length)
        self.cfg_dropout = float(cfg_dropout)
        config = GPT2Config(vocab_size=self.num_codes, n_positions=self.prefix_length + self.max_codes, n_embd=n_embd,
                            n_layer=n_layer, n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout,
                            attn_pdrop=dropout, activation_function=activation, bos_token_id=None,
                            eos_token_id=None)
        self.gpt = GPT2Model(config)  # its token embedding ``wte`` embeds the codes
        self.feature_proj = nn.Linear(self.feature_dim, n_embd)
        self.head = nn.Linear(n_embd, self.num_codes, bias=False)
        std = config.initializer_range
        nn.init.normal_(self.feature_proj.weight, std=std)
        nn.init.zeros_(self.feature_proj.bias)
        nn.init.normal_(self.head.weight, std=std)
        self.null_prefix = nn.Parameter(torch.randn(self.prefix_length, n_embd) * std) if cfg_dropout > 0 else None
        log.info("GPT2CodePrior: %d layers x %d, %d codes, %d prefix + %d code positions, %.1f M parameters",
                 n_layer, n_embd, self.num_codes, self.prefix_length, self.max_codes,
                 sum(p.numel() for p in self.parameters()) / 1e6)

    @property
    def n_embd(self) -> int:
        return int(self.gpt.config.n_embd)

    # ------------------------------------------------------------------ inputs
    def prefix(self, features: torch.Tensor, mask: torch.Tensor | None = None,
               drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected prefix ``(B, P, n_embd)`` and its mask ``(B, P)`` (True: attended) of text features
        ``(B, P, feature_dim)``; rows where ``drop (B,)`` is True get the null prefix instead."""
        if features.dim() != 3 or features.shape[1:] != (self.prefix_length, self.feature_dim):
            raise ValueError(f"GPT2CodePrior: text features must be (B, {self.prefix_length}, {self.feature_dim}), "
                             f"got {tuple(features.shape)}")  # fmt: skip
        b = features.shape[0]
        if mask is None:
            mask = torch.ones(b, self.prefix_length, dtype=torch.bool, device=features.device)
        elif tuple(mask.shape) != (b, self.prefix_length):
            raise ValueError(f"GPT2CodePrior: the prefix mask must be {(b, self.prefix_length)}, got {tuple(mask.shape)}")
        if not bool(mask[:, 0].all()):
            raise ValueError("GPT2CodePrior: every prefix needs its first position (features are right-padded)")
        param = self.feature_proj.weight
        x = self.feature_proj(features.to(param.device, param.dtype))
        mask = mask.to(param.device, torch.bool)
        if drop is not None and bool(drop.any()):
            if self.null_prefix is None:
                raise ValueError("GPT2CodePrior: dropping the text needs a null prefix: build it with cfg_dropout > 0")
            rows = drop.to(param.device).view(b, 1, 1)
            x = torch.where(rows, self.null_prefix.to(x.dtype).expand_as(x), x)
            mask = mask | rows.view(b, 1)
        return x, mask

    def _run(self, embeds: torch.Tensor, mask: torch.Tensor, cache: Any = None,
             use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        out = self.gpt(None, cache, attention_mask=mask.long(), inputs_embeds=embeds, use_cache=use_cache)
        return out.last_hidden_state, (_cache_of(out) if use_cache else None)

    # ------------------------------------------------------------------ training
    def forward(self, codes: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, N, num_codes)``: row ``i`` is ``p(s_i | s_{<i}, F_text)`` for codes ``(B, N)``."""
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= self.max_codes:
            raise ValueError(f"GPT2CodePrior: codes must be (B, N) with 1 <= N <= max_codes={self.max_codes}, "
                             f"got {tuple(codes.shape)}")  # fmt: skip
        prefix, pmask = self.prefix(features, mask, drop)
        codes = codes.to(prefix.device)
        embeds = torch.cat([prefix, self.gpt.wte(codes[:, :-1])], dim=1)
        full = torch.cat([pmask, pmask.new_ones(codes.shape[0], codes.shape[1] - 1)], dim=1)
        hidden, _ = self._run(embeds, full)
        return self.head(hidden[:, self.prefix_length - 1 :])

    def loss(self, codes: torch.Tensor, features: torch.Tensor, mask: torch.Tensor | None = None,
             drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: mean cross-entropy over the code positions, and the logits ``(B, N, num_codes)``."""
        logits = self(codes, features, mask, drop)
        target = codes.to(logits.device).long()
        return F.cross_entropy(logits.float().reshape(-1, self.num_codes), target.reshape(-1)), logits

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, features: torch.Tensor, length: int, mask: torch.Tensor | None = None, *,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               greedy: bool = False, guidance: float = 1.0, generator: Generators = None,
               use_cache: bool = True) -> torch.Tensor:
        """Codes ``(B, length)`` drawn autoregressively after the text prefix (see `next_codes` for
        temperature / top-k / top-p / greedy / generators). ``guidance`` != 1 mixes the
        log-probabilities of the text and the null prefix (needs ``cfg_dropout > 0`` at training)."""
        if not 1 <= length <= self.max_codes:
            raise ValueError(f"GPT2CodePrior: can sample 1..{self.max_codes} codes (max_codes), asked for {length}")
        b = features.shape[0]
        prefix, pmask = self.prefix(features, mask)
        guided = guidance != 1.0
        if guided:
            if self.null_prefix is None:
                raise ValueError(f"guidance {guidance} needs a prior trained with classifier-free dropout "
                                 "(cfg_dropout > 0, a null prefix); this one has none: use guidance 1")
            null, nmask = self.prefix(features, mask, torch.ones(b, dtype=torch.bool))
            prefix, pmask = torch.cat([prefix, null]), torch.cat([pmask, nmask])
        gens = _per_row(generator, b)
        codes = torch.empty(b, 0, dtype=torch.long, device=prefix.device)
        embeds, attn, cache = prefix, pmask, None
        for _ in range(length):
            if use_cache:
                hidden, cache = self._run(embeds, attn, cache, use_cache=True)
            else:
                hidden, _ = self._run(embeds, attn)
            logits = self.head(hidden[:, -1]).float()
            if guided:
                cond, uncond = logits.log_softmax(-1).chunk(2)
                logits = uncond + guidance * (cond - uncond)
            nxt = next_codes(logits, temperature, top_k, top_p, greedy, gens)
            codes = torch.cat([codes, nxt[:, None]], dim=1)
            step = self.gpt.wte(nxt.repeat(2) if guided else nxt)[:, None]
            embeds = step if use_cache else torch.cat([embeds, step], dim=1)
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        return codes
