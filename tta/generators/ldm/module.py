"""`LatentDiffusionModule` (registered ``latent_diffusion``): trains AudioLDM and Re-AudioLDM.

The frozen components come from their own ``tta fit`` checkpoints (self-describing, rebuilt by
`tta.training.loading.load_trained`): the mel VAE (``vae_checkpoint``, which also provides the
latent ``scale_factor`` and the mel front-end) and CLAP (``clap_checkpoint``, text tower for
FiLM and retrieval queries). Tests and library users may pass the networks directly instead.

A training step: mel -> VAE posterior sample x scale -> random timestep and noise -> UNet
conditioned on the prompt (FiLM) and, for Re-AudioLDM, the k table neighbours of the clip
(cached features; the clip itself is never its own neighbour) -> MSE to the noise, with
per-condition classifier-free-guidance dropout. Validation reports the same loss at fixed
timesteps and noise, so curves are comparable across runs; its clips retrieve from the index by
caption, as at test time. `tta fit` refuses a datastore holding any non-training clip of the
training manifest (`tta.retrieval.leakage`).

``init_from`` starts the UNet from a trained plain AudioLDM checkpoint (or an imported public
one, see `tta.pipelines`): every key must match except the new retrieval cross-attention, whose
zero-initialised output projection makes the fine-tuned model start exactly at AudioLDM.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from tta.generators.conditioning import Conditioner
from tta.generators.conditioning.text_tokens import CACHED_TOKENS
from tta.generators.ldm.conditioning import ClapTextFiLM
from tta.generators.ldm.generator import LatentAudioGenerator
from tta.generators.ldm.model import LatentDiffusion
from tta.generators.ldm.retrieval import RetrievalConditioner
from tta.generators.ldm.shard_conditions import cached_film, cached_tokens, check_cached_conditions
from tta.generators.noise import DDPMProcess, NoiseProcess
from tta.generators.vae.codec import LatentCodec
from tta.generators.vae.network import AutoencoderKL
from tta.registry import register
from tta.training.base import TTAModule
from tta.training.frozen_cache import SegmentCache, segment_keys
from tta.training.loading import load_trained_part, trained_state
from tta.training.schedule import adamw_with_warmup

log = logging.getLogger(__name__)


@register("module", "latent_diffusion")
class LatentDiffusionModule(TTAModule):
    """AudioLDM (``retrieval: null``) or Re-AudioLDM (a `RetrievalConditioner`).

    Args:
        unet: the denoising network (`tta.nn.unet.UNetModel`).
        vae_checkpoint / vae + scale_factor: the frozen mel VAE (a ``vae`` checkpoint, or a
            network and its latent scale).
        clap_checkpoint / clap: the frozen CLAP (a ``clap_trainer`` checkpoint, or a network) of the
            ``"text"`` FiLM conditioner; neither: no CLAP FiLM (the UNet's ``film_dim`` must be 0;
            a model conditioned by its ``conditioners`` alone, e.g. DreamAudio).
        retrieval: Re-AudioLDM's retrieval conditioner (None: plain AudioLDM); the conditioner
            ``"retrieval"``.
        conditioners: further conditioners ``{name: Conditioner}`` (``class_path`` entries in a
            config), after ``"text"`` (the CLAP FiLM built from ``clap``) and ``"retrieval"``; each
            reads its keys from the inputs the steps pass: the batch's entries (``id``, ``mel``,
            ...) plus ``captions``, ``neighbours`` and ``film`` (docs/architecture.md, "How to add
            a conditioner").
        film_null: null embedding of the prompt (``"learned"`` or ``"empty_prompt"``).
        film_scale: factor on the unit-norm CLAP embedding fed to FiLM: 1 (AudioLDM; public
            weights) or ``"unit_entries"`` (``sqrt(joint_dim)``: the FiLM path learns as fast as
            the rest; the demo configs).
        film_source: what the FiLM vector is made of in training and in the validation loss:
            ``"text"`` (the caption's CLAP text embedding; Re-AudioLDM) or ``"audio"`` (the clip's
            CLAP audio embedding, as AudioLDM trains; needs a CLAP with an audio tower, and lets
            uncaptioned audio train the model). Generation always uses the prompt's text embedding.
        cfg_dropout: per-conditioner dropout for classifier-free guidance (0.1 in the papers; a
            float for all, or by name), for the conditioners not given their own ``dropout``.
        num_train_timesteps, beta_start, beta_end, beta_schedule, objective: AudioLDM's DDPM
            (`DDPMProcess`), used when ``process`` is None.
        process: any noise process instead (``class_path: rectified_flow``, or ``ddpm``); the
            five DDPM scalars must then keep their defaults.
        lr, betas, weight_decay, warmup_steps: AdamW (Re-AudioLDM: lr 5e-5).
        init_from: a ``latent_diffusion`` checkpoint (or pipeline folder) whose UNet, and learned
            null FiLM vector when both have one, initialise this one.
        val_timesteps: noise levels of the fixed validation loss, as DDPM steps of a
            ``num_train_timesteps`` schedule (another process uses the same fractions of its path).
        cache_frozen: compute the frozen VAE's posterior (mean and log-variance, so every step
            still samples) and, for ``film_source="audio"``, the CLAP audio embedding once per
            training segment and train from that memory cache (`SegmentCache`); the losses equal
            live encoding. Prompt text vectors are memoised by CLAP itself. Batches of the
            ``shards`` datamodule may instead carry these outputs precomputed on disk
            (``tta data shard --with latent,clap,clap_audio,t5``: ``latent_moments``,
            ``clap_text`` / ``clap_audio`` and the ``t5_tokens`` of every `TextTokenContext`,
            `tta.generators.ldm.shard_conditions`); they are used instead of the frozen encoders
            (checked against them in ``on_fit_start``), with the same losses.
        eval_vocoder, eval_steps: vocoder (``griffinlim``, ``universal`` or a vocoder checkpoint)
            and steps of `generate_for_eval` (the ``eval_metrics`` callback; the process's fast sampler:
            DPM-Solver++ for DDPM, Euler for rectified flow).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae_checkpoint: str | None = None,
        vae: AutoencoderKL | None = None,
        scale_factor: float | None = None,
        clap_checkpoint: str | None = None,
        clap: nn.Module | None = None,
        retrieval: RetrievalConditioner | None = None,
        conditioners: dict[str, Conditioner] | None = None,
        film_null: str = "learned",
        film_scale: float | str = 1.0,
        film_source: str = "text",
        cfg_dropout: float | dict[str, float] = 0.1,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0015,
        beta_end: float = 0.0195,
        beta_schedule: str = "scaled_linear",
        objective: str = "eps",
        process: NoiseProcess | None = None,
        mel: str | dict[str, Any] = "audioldm",
        lr: float = 5.0e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        init_from: str | None = None,
        val_timesteps: tuple[int, ...] = (50, 250, 500, 750, 950),
        eval_vocoder: str = "griffinlim",
        eval_steps: int = 25,
        cache_frozen: bool = False,
        ema_decay: float | None = None,
        grad_clip: float | None = 1.0,
        nan_max_skips: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(mel=mel, ema_decay=ema_decay, grad_clip=grad_clip, nan_max_skips=nan_max_skips, seed=seed)
        self.save_hyperparameters(ignore=["unet", "vae", "clap", "retrieval", "conditioners", "process"])
        self.codec = self._build_codec(vae_checkpoint, vae, scale_factor)
        clap = self._build_clap(clap_checkpoint, clap)
        ddpm = DDPMProcess(num_train_timesteps, beta_start, beta_end, beta_schedule, objective)
        if process is not None and ddpm.config() != DDPMProcess().config():
            raise ValueError("give either process or the DDPM arguments (num_train_timesteps, beta_start, "
                             "beta_end, beta_schedule, objective), not both")
        text = None if clap is None else ClapTextFiLM(clap, film_null, film_scale)
        if text is None and retrieval is not None:
            raise ValueError("retrieval queries the index with the prompt's CLAP text embedding: give "
                             "clap_checkpoint or clap")
        self.model = LatentDiffusion(unet, self._conditioners(text, retrieval, conditioners), process or ddpm,
                                     cfg_dropout)
        self.film_source = self._check_film_source(film_source, clap)
        latent, concat = self.codec.latent_channels, self.model.concat_channels
        for attr, want in (("in_channels", latent + concat), ("out_channels", latent)):
            if getattr(unet, attr, want) != want:
                raise ValueError(f"the UNet's {attr} is {getattr(unet, attr)} but the VAE's latents have {latent} "
                                 f"channels" + (f" (plus {concat} concat conditioner channels)" if concat else ""))
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self.val_timesteps = tuple(int(t) for t in val_timesteps)
        if any(not 0 <= t < num_train_timesteps for t in self.val_timesteps):
            raise ValueError(f"val_timesteps {self.val_timesteps} must lie in [0, {num_train_timesteps})")
        self.eval_vocoder, self.eval_steps = eval_vocoder, int(eval_steps)
        self.__dict__["_eval_vocoder"] = None  # built on first use; not a submodule (not in checkpoints)
        self.cache_frozen = bool(cache_frozen)
        self.__dict__["_caches"] = {"moments": SegmentCache(), "film": SegmentCache()}  # not in checkpoints
        if init_from is not None:
            self.init_unet_from(init_from)

    # ---------------------------------------------------------------- components
    def _build_codec(self, path: str | None, vae: AutoencoderKL | None, scale: float | None) -> LatentCodec:
        if (path is None) == (vae is None):
            raise ValueError("give exactly one of vae_checkpoint (a `vae` checkpoint) and vae (a network)")
        if path is not None:
            vae_module, vae = load_trained_part(path, "autoencoder", "vae")
            self.mel_config.check_compatible(vae_module.mel_config, f"this model and the VAE of {path}")
            stored = float(vae_module.scale_factor)
            if scale is not None and not math.isclose(scale, stored, rel_tol=1e-6):
                raise ValueError(f"scale_factor {scale} contradicts the {stored} stored in {path}")
            scale = stored
        if scale is None:
            raise ValueError("a VAE network needs its scale_factor (1 / std of its latents)")
        return LatentCodec(vae, self.mel_config, scale)

    @staticmethod
    def _conditioners(text: ClapTextFiLM | None, retrieval: RetrievalConditioner | None,
                      extra: dict[str, Conditioner] | None) -> dict[str, Conditioner]:
        """``{"text" (if any), "retrieval" (if any), *extra}``; an extra one may not take their names."""
        own = {name: c for name, c in (("text", text), ("retrieval", retrieval)) if c is not None}
        clash = sorted({"text", "retrieval"} & set(extra or {}))
        if clash:
            raise ValueError(f"conditioners {clash} are built from this module's own arguments (clap/film_*, "
                             "retrieval); give the extra conditioners other names")
        return {**own, **(extra or {})}

    @staticmethod
    def _build_clap(path: str | None, clap: nn.Module | None) -> nn.Module | None:
        if path is None and clap is None:
            return None  # no CLAP FiLM
        if path is not None and clap is not None:
            raise ValueError("give at most one of clap_checkpoint (a `clap_trainer` checkpoint) and clap (a network)")
        if path is not None:
            _, clap = load_trained_part(path, "clap", "CLAP")
        clap.requires_grad_(False)
        if hasattr(clap, "freeze_all"):
            clap.freeze_all()
        return clap.eval()

    @staticmethod
    def _check_film_source(source: str, clap: nn.Module | None) -> str:
        if source not in ("text", "audio"):
            raise ValueError(f"film_source must be 'text' or 'audio', got {source!r}")
        if clap is None:
            if source == "audio":
                raise ValueError("film_source='audio' needs a CLAP (clap_checkpoint or clap); this model has no FiLM")
            return source
        from tta.encoders.clap.text_only import ClapTextOnly

        if source == "audio" and isinstance(clap, ClapTextOnly):
            raise ValueError("film_source='audio' needs a CLAP with an audio tower; this one is text-only "
                             "(e.g. imported from a public AudioLDM): use film_source='text'")
        return source

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        if self.model.text is not None:
            self.model.text.clap.eval()  # frozen: dropout/normalisation stay in inference mode
        return self

    def init_unet_from(self, path: str) -> None:
        """Copy a trained UNet's weights from a ``latent_diffusion`` checkpoint or a pipeline folder
        (e.g. an imported public AudioLDM); only the cross-attentions of this model's context
        conditioners (Re-AudioLDM's retrieval) may be new."""
        state = trained_state(path)
        prefix = "model.unet."
        source = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not source:
            raise KeyError(f"{path} holds no UNet weights (no '{prefix}*' keys)")
        target = self.model.unet.state_dict()
        contexts = list(self.model.routed("context"))
        unexpected = sorted(set(source) - set(target))
        missing = sorted(k for k in set(target) - set(source) if not any(f".{c}." in k for c in contexts))
        mismatched = sorted(k for k in set(source) & set(target) if source[k].shape != target[k].shape)
        if unexpected or missing or mismatched:
            raise KeyError(
                f"cannot initialise the UNet from {path}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"shape mismatch {mismatched[:5]} (only the cross-attention keys of {contexts} may be new)"
            )
        new = sorted(set(target) - set(source))
        target.update(source)
        self.model.unet.load_state_dict(target, strict=True)
        null = state.get("model.text.null")
        if null is not None and self.model.text is not None and self.model.text.null is not None:  # the trained unconditional FiLM vector too
            if null.shape != self.model.text.null.shape:
                raise KeyError(f"{path}: its learned null FiLM vector has shape {tuple(null.shape)}, "
                               f"this model's {tuple(self.model.text.null.shape)}")
            with torch.no_grad():
                self.model.text.null.copy_(null)
        log.info("UNet initialised from %s (%d tensors; %d new: the %s attention)", path, len(source), len(new),
                 contexts)

    def ema_target(self) -> nn.Module:
        return self.model

    # ---------------------------------------------------------------------- steps
    def _neighbours(self, ids: list[str], captions: list[str]) -> list[list[str]] | None:
        """Training, and evaluation batches of datastore clips: each clip's neighbour-table row.
        Other evaluation batches (validation clips): the index's neighbours of each caption, as at
        test time, so a datastore of the training split serves them (the clip itself excluded)."""
        retrieval = self.model.retrieval
        if retrieval is None:
            return None
        if self.training or all(i in retrieval.table for i in ids):
            return retrieval.training_neighbours(ids)
        return self.generator.query_neighbours(list(captions), exclude=[{i} for i in ids])

    def on_fit_start(self) -> None:
        """Refuse a retrieval datastore that holds non-training clips of the training manifest, and
        cached latents, CLAP embeddings or token states of other encoders than this model's."""
        retrieval, dm = self.model.retrieval, getattr(self.trainer, "datamodule", None)
        from tta.generators.vae.shard_latents import check_cached_latents

        check_cached_latents(self.codec.autoencoder, dm)
        check_cached_conditions(self.model, self.film_source, dm)
        if retrieval is None or retrieval.index_dir is None or not hasattr(dm, "manifest_path"):
            return
        from tta.retrieval.leakage import check_datastore

        train = check_datastore(retrieval.index.ids, dm.manifest_path(), dm.splits["train"], retrieval.index_dir)
        log.info("retrieval datastore %s: %d clips, %d of them from the training split, none from another split",
                 retrieval.index_dir, len(retrieval.index), train)

    def condition_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The conditioners' inputs of a training / validation batch: its entries (``id``,
        ``caption``, ``mel``, ...) plus ``captions``, the ``neighbours`` (see `_neighbours`) and
        the ``film`` embeddings (None: from the captions), and ``cached_tokens`` when the batch
        carries token states (`tta.generators.ldm.shard_conditions.cached_tokens`)."""
        inputs = {**batch, "captions": batch["caption"], "neighbours": self._neighbours(batch["id"], batch["caption"]),
                  "film": self._film(batch)}
        tokens = cached_tokens(batch)
        if tokens is not None:
            inputs[CACHED_TOKENS] = tokens
        return inputs

    def _film(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's FiLM embeddings: cached in the batch (shards), or for ``film_source="audio"``
        the clips' CLAP audio embeddings (None: from the captions)."""
        cached = cached_film(batch, self.film_source) if self.model.text is not None else None
        if cached is not None:  # checked against this model's CLAP in on_fit_start
            return cached
        if self.film_source == "text":
            if self.model.text is not None and not self.__dict__.get("_warned_uncaptioned") and any(c == "" for c in batch["caption"]):
                self.__dict__["_warned_uncaptioned"] = True
                log.warning("uncaptioned clips (e.g. %s) condition the text FiLM on an empty prompt; "
                            "film_source='audio' trains on such audio as AudioLDM does",
                            [i for i, c in zip(batch["id"], batch["caption"]) if c == ""][:3])
            return None
        if "wav" not in batch:
            raise KeyError("film_source='audio' needs the clips' waveforms: the batch has no 'wav'")
        sr = self.mel_config.sample_rate
        if not (self.cache_frozen and self.training):
            return self.model.text.embed_audio(batch["wav"], sr)
        return self._caches["film"].get(segment_keys(batch),
                                        lambda rows: self.model.text.embed_audio(batch["wav"][rows], sr), self.device)

    def training_latents(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Scaled posterior samples of the batch's mels (posterior parameters from the cache with
        ``cache_frozen``, or precomputed in the batch by ``tta data shard --with latent``: the same
        draw from the same ``generator`` as live encoding)."""
        if "latent_moments" in batch:  # the shards datamodule; its VAE is checked in on_fit_start
            return self.codec.from_moments(batch["latent_moments"].float(), generator)
        mel = batch["mel"].float()
        if not self.cache_frozen:
            return self.codec.encode(mel, generator=generator)
        moments = self._caches["moments"].get(segment_keys(batch), lambda rows: self.codec.moments(mel[rows]),
                                              mel.device)
        return self.codec.from_moments(moments, generator)

    def clip_losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of each clip of ``batch`` as squared errors ``(B, C, H, W)`` (their mean is
        the batch loss); noise, times and dropout from `step_generator`."""
        g = self.step_generator()
        latents = self.training_latents(batch, g)
        return self.model.loss(latents, self.condition_inputs(batch), generator=g, reduction="none")

    def train_step(self, batch: dict[str, Any]) -> None:
        loss = self.finite_batch_loss(batch, self.clip_losses)  # non-finite clips named and left out
        (opt, sched), = self.optimizer_pairs(1)
        self.guarded_step(loss, opt, [p for p in self.model.parameters() if p.requires_grad], sched)
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, batch_size=len(batch["id"]))

    def fixed_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean loss over ``val_timesteps`` with fixed noise and no condition dropout."""
        g = torch.Generator().manual_seed(self.seed)
        latents = self.codec.encode(batch["mel"].float(), sample=False)
        b = latents.shape[0]
        keep = {c: torch.zeros(b, dtype=torch.bool) for c in self.model.conditioner_names}
        inputs = self.condition_inputs(batch)
        last = self.hparams["num_train_timesteps"] - 1
        times = self.model.process.fixed_times([t / last for t in self.val_timesteps])
        losses = [self.model.loss(latents, inputs, generator=g, t=t.expand(b), drop=keep) for t in times]
        return torch.stack(losses).mean()

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if "mel" not in batch:
            return
        self.log(f"{stage}/loss", self.fixed_loss(batch), prog_bar=stage == "val", batch_size=len(batch["id"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt, sched = adamw_with_warmup(params, self.lr, self.betas, self.weight_decay, self.warmup_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # ------------------------------------------------------------------ sampling
    @property
    def generator(self) -> LatentAudioGenerator:
        """The pure inference model over this module's front-end, codec and diffusion model (the
        same submodules: training moves it); it owns the sampling API (``generate_mel``)."""
        gen = self.__dict__.get("_generator")
        if gen is None:  # not a submodule: its weights are this module's own
            gen = self.__dict__["_generator"] = LatentAudioGenerator(self.frontend, self.codec, self.model)
        return gen

    @torch.no_grad()
    def generate_for_eval(self, captions: list[str], ids: list[str], seconds: float) -> torch.Tensor:
        """Waveforms ``(B, T)`` for the ``eval_metrics`` callback (a clip never retrieves itself)."""
        from tta.vocoders.factory import vocoder_spec

        if self.__dict__["_eval_vocoder"] is None:
            self.__dict__["_eval_vocoder"] = vocoder_spec(self.eval_vocoder, self.mel_config)[0]
        gen = self.generator
        neighbours = gen.query_neighbours(captions, exclude=[{i} for i in ids])
        mel = gen.generate_mel(list(captions), gen.frames_for(seconds), steps=self.eval_steps,
                               sampler=self.model.process.fast_sampler, neighbours=neighbours, inputs={"id": list(ids)})
        vocoder = self.__dict__["_eval_vocoder"].to(mel.device)
        return vocoder(mel).float()[..., : round(seconds * self.mel_config.sample_rate)]

    def demo_outputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """For the demo callback: the real mels and generations for their captions."""
        frames = batch["mel"].shape[-1]
        ids = batch["id"]
        neighbours = self._neighbours(ids, batch["caption"])
        gen = self.generator.generate_mel(list(batch["caption"]), frames, steps=25, neighbours=neighbours,
                                          inputs=batch)
        return {"input": batch["mel"], "generated": gen}
