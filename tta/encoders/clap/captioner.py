"""`ClapCaptioner` (registered ``clap_captioner``): MS-CLAP 2023 audio captioning.

A frozen CLAP audio tower (any `AudioEncoder` + its projection) gives the L2-normalised joint
embedding of a clip; a *mapper* turns it into ``prefix_length`` GPT2 input embeddings (ClipCap);
GPT2 (``transformers.GPT2LMHeadModel``) continues the prefix with the caption.

- Mappers: ``"transformer"`` (MS-CLAP's choice: ``Linear(D -> clip_length x E)``, concatenated
  with ``prefix_length`` learned constants, a pre-norm transformer encoder with ReLU MLPs of
  width ``2E``; the outputs at the constants' positions are the prefix) or ``"mlp"`` (ClipCap:
  ``Linear(D -> P E / 2) -> tanh -> Linear(-> P E)``).
- Training loss: token cross-entropy on the caption tokens only (the end-of-text token closing
  each caption included), averaged over the real tokens of the batch; prefix positions and
  padding never enter it. Captions are ``tokenizer(caption) + [eos]``, at most
  ``max_caption_tokens`` tokens, right-padded.
- GPT2 is frozen by default (MS-CLAP: ``freeze_gpt_weights``); ``train_lm=True`` fine-tunes it.
- The LM comes from a local Hugging Face folder (``lm``: ``config.json`` + ``*.safetensors`` +
  tokenizer files) or, for tests and the CPU demo, from ``lm_config`` (fields of a
  ``GPT2Config``, randomly initialised) with a tokenizer folder or ``tokenizer="bytes"``: a
  byte-level tokenizer without merges (256 byte tokens + ``<|endoftext|>``) that needs no files.

Decoding (`greedy_search`, `beam_search`) is deterministic and written here; see
`beam_search` for the exact rules (EOS handling, length normalisation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.encoders.clap.network import CLAP
from tta.encoders.text import check_texts
from tta.encoders.text_hf import (
    check_hf_folder,
    check_model_type,
    load_model_strict,
    load_tokenizer,
)
from tta.registry import register

log = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``step(rows (N,), tokens (N, t)) -> log-probabilities (N, V)`` of the next token of each
hypothesis; ``rows`` names the batch item (clip) each hypothesis belongs to."""

EOT = "<|endoftext|>"


def byte_tokenizer() -> Any:
    """A GPT2-style byte-level tokenizer without merges: 256 byte tokens, then ``<|endoftext|>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOT] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


# ----------------------------------------------------------------------------------- decoding
def greedy_search(step: StepFn, batch: int, max_len: int, eos_id: int) -> list[list[int]]:
    """Most probable next token at every step until ``eos_id`` or ``max_len`` tokens.

    Returns the generated tokens of each of the ``batch`` items, without the EOS token.
    """
    out: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch)
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    for _ in range(max_len):
        nxt = step(rows, tokens).argmax(-1).cpu()
        keep = []
        for i, (r, tok) in enumerate(zip(rows.tolist(), nxt.tolist())):
            if tok != eos_id:
                out[r].append(tok)
                keep.append(i)
        if not keep:
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)[keep]
        rows = rows[keep]
    return out


def beam_search(
    step: StepFn, batch: int, max_len: int, eos_id: int, beam_size: int, length_penalty: float = 1.0
) -> list[list[int]]:
    """Beam search; returns the best hypothesis of each batch item, without the EOS token.

    Rules (deterministic):

    - every item starts with one empty hypothesis and a budget of ``beam_size``;
    - at each step the candidates (live hypothesis + one token) are ranked by their summed
      log-probability (ties: lower hypothesis index, then lower token id) and the best
      ``budget`` are kept; a kept candidate ending in ``eos_id`` is finished and reduces the
      budget by one, the others are the live hypotheses of the next step (no refill, so
      ``beam_size=1`` is exactly `greedy_search`);
    - the search of an item ends when its budget is spent or after ``max_len`` tokens, when the
      live hypotheses are finished as they are;
    - the returned hypothesis maximises ``sum log p / length ** length_penalty`` over the
      finished ones, ``length`` counting the generated tokens including the EOS token
      (``length_penalty=0``: raw log-probability; 1: mean per token). Ties: first finished.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    budget = [beam_size] * batch
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    rows = torch.arange(batch)
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    scores = torch.zeros(batch, dtype=torch.float64)
    for _ in range(max_len):
        if rows.numel() == 0:
            break
        logp = step(rows, tokens).to("cpu", torch.float64)
        vocab = logp.shape[1]
        cand = scores[:, None] + logp
        parents, new_tok, new_scores = [], [], []
        for b in dict.fromkeys(rows.tolist()):
            idx = (rows == b).nonzero().squeeze(1)
            flat = cand[idx].reshape(-1)
            order = torch.sort(flat, descending=True, stable=True).indices[: budget[b]].tolist()
            for o in order:
                parent, tok, score = int(idx[o // vocab]), o % vocab, float(flat[o])
                if tok == eos_id:
                    finished[b].append((score, tokens[parent].tolist() + [eos_id]))
                    budget[b] -= 1
                else:
                    parents.append(parent)
                    new_tok.append(tok)
                    new_scores.append(score)
        parent_idx = torch.tensor(parents, dtype=torch.long)
        tokens = torch.cat([tokens[parent_idx], torch.tensor(new_tok, dtype=torch.long)[:, None]], dim=1)
        rows = rows[parent_idx]
        scores = torch.tensor(new_scores, dtype=torch.float64)
    for r, seq, s in zip(rows.tolist(), tokens.tolist(), scores.tolist()):
        finished[r].append((s, seq))
    best = []
    for hyps in finished:
        # max() returns the first maximal element: ties go to the hypothesis finished first
        score, seq = max(hyps, key=lambda h: h[0] / len(h[1]) ** length_penalty if h[1] else h[0])
        best.append(seq[:-1] if seq and seq[-1] == eos_id else seq)
    return best


# ------------------------------------------------------------------------------------ mappers
class MLPMapper(nn.Module):
    """ClipCap's MLP: ``(B, D) -> (B, P, E)`` through one tanh hidden layer of width ``P E / 2``."""

    def __init__(self, d_in: int, width: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        hidden = max(1, prefix_length * width // 2)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.width)


class TransformerMapper(nn.Module):
    """MS-CLAP / ClipCap transformer mapper: ``(B, D) -> (B, P, E)``.

    ``x -> Linear -> (B, clip_length, E)``, concatenated with ``P`` learned constants, through
    ``layers`` pre-norm encoder layers (``heads`` heads, ReLU MLP of width ``2E``); the outputs
    at the constants' positions are the prefix.
    """

    def __init__(
        self, d_in: int, width: int, prefix_length: int, clip_length: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"TransformerMapper: LM width {width} is not divisible by mapper_heads={heads}")
        self.prefix_length, self.clip_length, self.width = prefix_length, clip_length, width
        self.linear = nn.Linear(d_in, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=dropout, activation="relu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        clip = self.linear(x).view(b, self.clip_length, self.width)
        h = torch.cat([clip, self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(clip.dtype)], dim=1)
        return self.transformer(h)[:, self.clip_length :]


# --------------------------------------------------------------------------------- the model
def load_clap(clap: CLAP | None, clap_checkpoint: str | os.PathLike | None, use_ema: bool = False) -> CLAP:
    """The CLAP given as a network, or the ``clap`` of a ``clap_trainer`` checkpoint (`load_trained`)."""
    if (clap is None) == (clap_checkpoint is None):
        raise ValueError("ClapCaptioner needs exactly one of `clap` (a CLAP network) and `clap_checkpoint` (a path)")
    if clap is not None:
        return clap
    from tta.encoders.clap_towers import load_clap_network

    network = load_clap_network(clap_checkpoint, use_ema=use_ema)
    if not isinstance(network, CLAP):  # a text-only CLAP cannot hear the clips it captions
        raise TypeError(f"{clap_checkpoint}: holds a {type(network).__name__}, not a full CLAP network; "
                        "expected a `clap_trainer` checkpoint")
    return network


@register("network", "clap_captioner")
class ClapCaptioner(nn.Module):
    """Frozen CLAP audio tower + mapper + GPT2 (MS-CLAP 2023 captioning); see the module doc.

    Args:
        lm: local GPT2 folder (``GPT2LMHeadModel`` weights + tokenizer); or None with ``lm_config``.
        lm_config: ``GPT2Config`` fields of a randomly initialised LM (``vocab_size`` and the
            EOS/BOS ids come from the tokenizer).
        tokenizer: tokenizer folder; default the ``lm`` folder; ``"bytes"`` = `byte_tokenizer`.
        clap: a CLAP network (its text tower is dropped); or None with ``clap_checkpoint``.
        clap_checkpoint: a ``clap_trainer`` checkpoint, rebuilt with `load_trained`.
        clap_use_ema: take the EMA weights of ``clap_checkpoint``.
        prefix_length: GPT2 prefix tokens (MS-CLAP: 40).
        mapper: ``"transformer"`` (MS-CLAP) or ``"mlp"`` (ClipCap).
        clip_length, mapper_layers, mapper_heads, mapper_dropout: transformer mapper sizes
            (MS-CLAP: 40, 8, 8, 0).
        train_lm: fine-tune GPT2 too (default frozen).
        max_caption_tokens: training captions are truncated to this many tokens (EOS included).
    """

    def __init__(
        self,
        lm: str | None = None,
        lm_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        clap: CLAP | None = None,
        clap_checkpoint: str | None = None,
        clap_use_ema: bool = False,
        prefix_length: int = 40,
        mapper: Literal["transformer", "mlp"] = "transformer",
        clip_length: int = 40,
        mapper_layers: int = 8,
        mapper_heads: int = 8,
        mapper_dropout: float = 0.0,
        train_lm: bool = False,
        max_caption_tokens: int = 40,
    ) -> None:
        super().__init__()
        if prefix_length < 1 or max_caption_tokens < 2:
            raise ValueError(
                f"ClapCaptioner: prefix_length must be >= 1 and max_caption_tokens >= 2, "
                f"got {prefix_length} and {max_caption_tokens}"
            )
        source = load_clap(clap, clap_checkpoint, clap_use_ema)
        self.audio_encoder = source.audio_encoder.freeze()
        self.audio_projection = source.audio_projection.requires_grad_(False).eval()
        self.joint_dim = int(source.joint_dim)
        self.tokenizer, self.lm = self._build_lm(lm, lm_config, tokenizer)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.vocab = len(self.tokenizer)
        self.width = int(self.lm.config.n_embd)
        self.prefix_length, self.max_caption_tokens = int(prefix_length), int(max_caption_tokens)
        self.train_lm = bool(train_lm)
        positions = int(self.lm.config.n_positions)
        if positions < self.prefix_length + self.max_caption_tokens:
            raise ValueError(
                f"ClapCaptioner: prefix_length ({prefix_length}) + max_caption_tokens ({max_caption_tokens}) "
                f"exceeds the {positions} positions of the LM"
            )
        if not self.train_lm:
            self.lm.requires_grad_(False).eval()
        if mapper == "transformer":
            self.mapper: nn.Module = TransformerMapper(
                self.joint_dim, self.width, self.prefix_length, clip_length, mapper_layers, mapper_heads,
                mapper_dropout,
            )  # fmt: skip
        elif mapper == "mlp":
            self.mapper = MLPMapper(self.joint_dim, self.width, self.prefix_length)
        else:
            raise ValueError(f"ClapCaptioner: mapper must be 'transformer' or 'mlp', got {mapper!r}")
        log.info(
            "ClapCaptioner: joint dim %d -> %s mapper -> %d x %d prefix; LM %s (%s), vocab %d",
            self.joint_dim, mapper, self.prefix_length, self.width, lm or "from lm_config",
            "trainable" if self.train_lm else "frozen", self.vocab,
        )  # fmt: skip

    @staticmethod
    def _build_lm(lm: str | None, lm_config: dict[str, Any] | None, tokenizer: str | None) -> tuple[Any, nn.Module]:
        from transformers import GPT2Config, GPT2LMHeadModel

        if (lm is None) == (lm_config is None):
            raise ValueError("ClapCaptioner needs exactly one of `lm` (a local GPT2 folder) and `lm_config`")
        if tokenizer == "bytes":
            tok = byte_tokenizer()
        elif tokenizer is not None:
            tok = load_tokenizer(check_hf_folder(tokenizer))
        elif lm is not None:
            tok = None
        else:
            raise ValueError("ClapCaptioner: `lm_config` needs `tokenizer` (a tokenizer folder or 'bytes')")
        if lm is not None:
            folder = check_hf_folder(lm, need_tokenizer=tok is None)
            check_model_type(folder, frozenset({"gpt2"}), "ClapCaptioner")
            model = load_model_strict(GPT2LMHeadModel, folder)
            tok = tok if tok is not None else load_tokenizer(folder)
        else:
            fields = dict(lm_config or {})
            if "vocab_size" in fields and fields["vocab_size"] != len(tok):
                raise ValueError(
                    f"ClapCaptioner: lm_config.vocab_size {fields['vocab_size']} != tokenizer size {len(tok)}"
                )
            fields.update(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
            model = GPT2LMHeadModel(GPT2Config(**fields))
        if tok.eos_token_id is None:
            raise ValueError(f"ClapCaptioner: the tokenizer of {lm or tokenizer} has no eos (end-of-text) token")
        if len(tok) > model.config.vocab_size:
            raise ValueError(
                f"ClapCaptioner: tokenizer has {len(tok)} tokens but the LM only {model.config.vocab_size} embeddings"
            )
        return tok, model

    # ------------------------------------------------------------------------------ pieces
    @property
    def sample_rate(self) -> int:
        return self.audio_encoder.sample_rate

    def train(self, mode: bool = True) -> ClapCaptioner:
        """Train mode for the mapper (and GPT2 with ``train_lm``); the frozen parts stay in eval mode."""
        super().train(mode)
        self.audio_encoder.train(False)
        self.audio_projection.train(False)
        if not self.train_lm:
            self.lm.train(False)
        return self

    @torch.no_grad()
    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Normalised CLAP joint embeddings ``(B, joint_dim)`` of waveforms ``(B, T)`` (frozen)."""
        return F.normalize(self.audio_projection(self.audio_encoder(wav).pooled).float(), dim=-1)

    def prefix(self, wav: torch.Tensor) -> torch.Tensor:
        """GPT2 prefix embeddings ``(B, prefix_length, E)``."""
        return self.mapper(self.embed(wav))

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``(B, T)`` (caption + EOS, right-padded with EOS) and their mask, on the LM's device."""
        captions = check_texts(captions)
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise ValueError(f"ClapCaptioner: captions {empty} are empty; drop uncaptioned clips before training")
        rows = self.tokenizer(captions, add_special_tokens=False)["input_ids"]
        rows = [list(r)[: self.max_caption_tokens - 1] + [self.eos_id] for r in rows]
        length = max(len(r) for r in rows)
        device = self.lm.get_input_embeddings().weight.device
        ids = torch.full((len(rows), length), self.eos_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)

    def caption_logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` predicting ``ids[:, t]`` from the prefix and ``ids[:, :t]``."""
        emb = self.lm.get_input_embeddings()(ids)
        x = torch.cat([prefix.to(emb.dtype), emb], dim=1)
        logits = self.lm(inputs_embeds=x).logits
        p = prefix.shape[1]
        return logits[:, p - 1 : p - 1 + ids.shape[1]]

    def loss(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the real caption tokens (``mask``); prefix and padding excluded."""
        logits = self.caption_logits(prefix, ids)
        return F.cross_entropy(logits[mask].float(), ids[mask])

    def forward(self, wav: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """LM loss of ``captions`` given the clips ``wav`` ``(B, T)``."""
        ids, mask = self.tokenize(captions)
        if len(captions) != wav.shape[0]:
            raise ValueError(f"ClapCaptioner: {wav.shape[0]} clips but {len(captions)} captions")
        return self.loss(self.prefix(wav), ids, mask)

    # ---------------------------------------------------------------------------- decoding
    def _step_fn(self, prefix: torch.Tensor) -> StepFn:
        wte = self.lm.get_input_embeddings()

        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            rows, tokens = rows.to(prefix.device), tokens.to(prefix.device)
            x = torch.cat([prefix[rows], wte(tokens).to(prefix.dtype)], dim=1)
            logits = self.lm(inputs_embeds=x).logits[:, -1].float()
            logits[:, self.vocab :] = float("-inf")  # embedding rows beyond the tokenizer
            return F.log_softmax(logits, dim=-1)

        return step

    @torch.no_grad()
    def generate_tokens(
        self, wav: torch.Tensor, max_len: int = 30, beam_size: int = 1, length_penalty: float = 1.0
    ) -> list[list[int]]:
        """Token ids of the caption of each clip (EOS removed); greedy when ``beam_size == 1``."""
        positions = int(self.lm.config.n_positions)
        if self.prefix_length + max_len - 1 > positions:
            raise ValueError(f"ClapCaptioner: prefix {self.prefix_length} + max_len {max_len} exceeds {positions}")
        was_training = self.training
        self.eval()
        try:
            prefix = self.prefix(wav)
            step = self._step_fn(prefix)
            if beam_size == 1:
                return greedy_search(step, wav.shape[0], max_len, self.eos_id)
            return beam_search(step, wav.shape[0], max_len, self.eos_id, beam_size, length_penalty)
        finally:
            self.train(was_training)

    def decode(self, tokens: list[int]) -> str:
        """Caption text of generated token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def generate(
        self, wav: torch.Tensor, max_len: int = 30, beam_size: int = 1, length_penalty: float = 1.0
    ) -> list[str]:
        """Captions of clips ``wav`` ``(B, T)``: greedy (``beam_size=1``) or beam search; deterministic."""
        return [self.decode(t) for t in self.generate_tokens(wav, max_len, beam_size, length_penalty)]
