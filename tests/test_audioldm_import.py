"""``tta pipeline import-audioldm``: a tiny random diffusers AudioLDM folder -> a tta pipeline folder
whose UNet, conditioning, VAE, vocoder and whole DDIM generation equal diffusers'."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf_fixtures import roberta_tokenizer
from tta.cli import main
from tta.encoders.clap.text_only import ClapTextOnly, NoAudioTowerError
from tta.pipelines.audioldm_import import (
    check_audioldm_folder,
    import_audioldm,
    schedule_from_diffusers,
)
from tta.pipelines.ldm import load_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a dog barks", "rain falls on a roof in the morning"]
JOINT = 16  # CLAP projection width = the UNet's class-embedding input
LATENT = 8  # AudioLDM's latent channels
MAX_TOKENS = 64  # the tokenizer's model_max_length (66 positions - pad 1 - 1)
SCALE = 0.6  # the VAE's scaling_factor
DURATION = 0.16  # 16 frames of hop 160 at 16 kHz: latents (8, 8, 32)


def _perturb(module: torch.nn.Module, std: float, seed: int) -> None:
    """Move every parameter off its initial value so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def build_audioldm_folder(folder: Path) -> Any:
    """A tiny random ``AudioLDMPipeline`` (AudioLDM layouts, 64 mels, hop 160) saved with save_pretrained."""
    from diffusers import (
        AudioLDMPipeline,
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    torch.manual_seed(0)
    tok = roberta_tokenizer()
    tok.model_max_length = MAX_TOKENS
    text = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_TOKENS + 2, projection_dim=JOINT, pad_token_id=1,
    ))  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT, out_channels=LATENT, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=[32, 64], attention_head_dim=2, norm_num_groups=8, class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=JOINT, class_embeddings_concat=True,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
        latent_channels=LATENT, norm_num_groups=32, scaling_factor=SCALE,
    )  # fmt: skip
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=64, sampling_rate=16000, upsample_initial_channel=32, upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    ))  # fmt: skip
    for i, (net, std) in enumerate(
        ((text, 0.05), (unet, 0.05), (vae, 0.05), (vocoder, 0.1))
    ):
        _perturb(net, std, seed=i)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )  # fmt: skip
    pipe = AudioLDMPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                            vocoder=vocoder)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    for net in (text, unet, vae, vocoder):
        net.eval()
    return pipe


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audioldm")
    ref = build_audioldm_folder(root / "diffusers")
    out = root / "pipe"
    assert (
        main(
            [
                "pipeline",
                "import-audioldm",
                str(root / "diffusers"),
                "--out",
                str(out),
                "--steps",
                "7",
            ]
        )
        == 0
    )
    return {
        "ref": ref,
        "folder": root / "diffusers",
        "out": out,
        "pipe": load_pipeline(out),
    }


def _their_text_embeds(
    ref: Any, prompts: list[str], length: int = MAX_TOKENS
) -> torch.Tensor:
    """As AudioLDMPipeline._encode_prompt: padded to max length, ``text_embeds`` L2-normalised."""
    enc = ref.tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = ref.text_encoder(
            enc.input_ids, attention_mask=enc.attention_mask
        ).text_embeds
    return F.normalize(out, dim=-1)


def test_pipeline_json_and_folder(imported: dict[str, Any]) -> None:
    out = imported["out"]
    meta = json.loads((out / "pipeline.json").read_text())
    init = meta["model"]["init_args"]
    assert (
        init["retrieval"] is None
        and init["film_null"] == "empty_prompt"
        and init["scale_factor"] == SCALE
    )
    assert {k: init[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "objective")} == {
        "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
        "objective": "eps"}  # fmt: skip
    assert init["clap"]["class_path"].endswith("ClapTextOnly")
    assert init["clap"]["init_args"]["text_encoder"]["init_args"] == {
        "path": "text_encoder",
        "max_length": MAX_TOKENS,
    }
    assert meta["relative_paths"] == [
        "model/init_args/clap/init_args/text_encoder/init_args/path"
    ]
    assert meta["vocoder"]["init_args"]["normalize_input"] is False
    assert meta["defaults"]["steps"] == 7 and meta["defaults"]["guidance"] == 2.5
    assert meta["mel"]["name"] == "audioldm"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (out / "text_encoder").iterdir()
    }
    assert not [
        p for p in out.parent.iterdir() if p.name.startswith(".pipe.")
    ]  # no temporary folder left
    pipe = imported["pipe"]
    assert isinstance(pipe.generator.model.text.clap, ClapTextOnly)
    assert pipe.generator.model.text.null is None and pipe.sample_rate == 16000
    assert pipe.generator.model.schedule.betas.shape == (1000,)


def test_text_embeddings_equal_normalised_text_embeds(imported: dict[str, Any]) -> None:
    text = imported["pipe"].generator.model.text
    ours = text.embed([*PROMPTS, ""])
    theirs = _their_text_embeds(imported["ref"], [*PROMPTS, ""])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))
    # the unconditional embedding is CLAP(""), as diffusers' negative prompt
    torch.testing.assert_close(
        text.null_embedding(2), theirs[2:].expand(2, -1), atol=1e-5, rtol=0
    )
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)


def test_unet_output_with_our_conditioning_equals_diffusers(
    imported: dict[str, Any],
) -> None:
    model, ref = imported["pipe"].generator.model, imported["ref"]
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, LATENT, 8, 32, generator=g), torch.tensor([10, 981])
    cond = model.conditioning(PROMPTS)
    with torch.no_grad():
        for ours_cond, prompts in (
            (cond, PROMPTS),
            (model.unconditional(cond), ["", ""]),
        ):
            labels = _their_text_embeds(ref, prompts)
            theirs = ref.unet(
                x, t, encoder_hidden_states=None, class_labels=labels
            ).sample
            ours = model.denoise(x, t, ours_cond)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.abs().mean() > 0.05


def test_vae_decode_and_vocoder_equal_diffusers(imported: dict[str, Any]) -> None:
    pipe, ref = imported["pipe"], imported["ref"]
    z = torch.randn(2, LATENT, 8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = pipe.generator.codec.decode(z)  # (B, n_mels, frames)
        theirs = ref.vae.decode(z / SCALE).sample  # (B, 1, frames, n_mels)
        assert ours.shape == (2, 64, 16)
        torch.testing.assert_close(
            ours, theirs.squeeze(1).transpose(1, 2), atol=1e-5, rtol=0
        )
        wav = pipe.vocoder(ours)
        ref_wav = ref.vocoder(theirs.squeeze(1))
    assert wav.shape == (2, 16 * 160)
    torch.testing.assert_close(wav, ref_wav[:, : 16 * 160], atol=1e-5, rtol=0)
    assert wav.abs().max() > 1e-3


def test_whole_generation_equals_audioldm_pipeline(imported: dict[str, Any]) -> None:
    pipe, ref = imported["pipe"], imported["ref"]
    noise = torch.randn(2, LATENT, 8, 32, generator=torch.Generator().manual_seed(5))
    final: dict[str, torch.Tensor] = {}

    def keep_latents(step: int, t: Any, latents: torch.Tensor) -> None:
        final["z"] = latents.clone()

    theirs = ref(PROMPTS, audio_length_in_s=DURATION, num_inference_steps=4, guidance_scale=2.5,
                 latents=noise.clone(), output_type="pt", callback=keep_latents, callback_steps=1).audios  # fmt: skip
    with torch.no_grad():
        their_mel = ref.vae.decode(final["z"] / SCALE).sample.squeeze(1).transpose(1, 2)
    ours = pipe.generate(PROMPTS, duration=DURATION, steps=4, guidance=2.5, noise=noise)
    assert ours.mel.shape == their_mel.shape == (2, 64, 16)
    assert ours.wav.shape == theirs.shape == (2, round(DURATION * 16000))
    torch.testing.assert_close(ours.mel, their_mel, atol=1e-4, rtol=0)  # measured: 4e-6
    torch.testing.assert_close(ours.wav, theirs, atol=1e-5, rtol=0)
    assert float(theirs.abs().max()) > 1e-3
    # the comparison can fail: another guidance scale moves the mel by ~3e-2
    other = pipe.generate(
        PROMPTS, duration=DURATION, steps=4, guidance=1.0, noise=noise
    ).mel
    assert (other - their_mel).abs().max() > 1e-2
    # without the injected noise the seed decides, and reproducibly
    again = pipe.generate(PROMPTS[:1], duration=DURATION, steps=2, seed=1).wav
    assert torch.equal(
        again, pipe.generate(PROMPTS[:1], duration=DURATION, steps=2, seed=1).wav
    )
    with pytest.raises(ValueError, match="noise has shape"):
        pipe.generate(PROMPTS, duration=DURATION, steps=1, noise=noise[:1])


def test_text_only_clap_refuses_reranking(imported: dict[str, Any]) -> None:
    pipe = imported["pipe"]
    with pytest.raises(
        NoAudioTowerError,
        match="no audio tower: candidate re-ranking needs a full CLAP",
    ):
        pipe.generate(PROMPTS[:1], duration=DURATION, steps=1, candidates=2)
    with pytest.raises(NoAudioTowerError):
        pipe.generator.model.text.clap.embed_audio(torch.zeros(1, 16000))


def test_a_separate_full_clap_reranks_candidates(imported: dict[str, Any], tmp_path: Path) -> None:
    """Imported pipelines re-rank with a given full CLAP; the kept clip is its best-scoring one."""
    from tests.hf_fixtures import make_bert_folder
    from tests.ldm_fixtures import build, tiny_clap_config

    pipe = imported["pipe"]
    clap = build(tiny_clap_config(make_bert_folder(tmp_path / "bert"))).eval()
    pipe.rerank_clap = clap
    try:
        best = pipe.generate(PROMPTS[:2], duration=DURATION, steps=1, candidates=3, seed=4)
        every = pipe.generate([p for p in PROMPTS[:2] for _ in range(3)], duration=DURATION, steps=1, seed=4)
    finally:
        pipe.rerank_clap = None
    assert best.wav.shape[0] == 2 and best.settings["rerank_clap"] == "separate"
    from tta.data.audio import resample

    audio = resample(every.wav, pipe.sample_rate, clap.sample_rate)
    sims = (clap.embed_audio(audio) * clap.embed_text([p for p in PROMPTS[:2] for _ in range(3)])).sum(-1).view(2, 3)
    assert best.clap_scores == pytest.approx(sims.max(dim=1).values.tolist(), abs=1e-5)


def test_moved_pipeline_folder_still_loads(
    imported: dict[str, Any], tmp_path: Path
) -> None:
    first = import_audioldm(imported["folder"], tmp_path / "a", defaults={"steps": 3})
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    os.replace(first, moved)
    pipe = load_pipeline(moved)
    emb = pipe.generator.model.text.embed(PROMPTS)
    torch.testing.assert_close(
        emb, _their_text_embeds(imported["ref"], PROMPTS), atol=1e-5, rtol=0
    )
    assert pipe.defaults["steps"] == 3
    with pytest.raises(FileExistsError, match="not an empty folder"):
        import_audioldm(imported["folder"], moved)


def test_missing_component_and_wrong_pipeline_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "AudioLDMPipeline"})
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"missing vae/ \(AutoencoderKL\), vocoder/ \(transformers Speech",
    ):
        import_audioldm(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "AudioLDM2Pipeline"})
    )
    with pytest.raises(
        ValueError, match="'AudioLDM2Pipeline'; only 'AudioLDMPipeline'"
    ):
        check_audioldm_folder(folder)
    shutil.rmtree(folder / "unet")
    (folder / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        check_audioldm_folder(folder)


def test_scheduler_config_translation(caplog: pytest.LogCaptureFixture) -> None:
    base = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "linear", "prediction_type": "v_prediction", "trained_betas": None,
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}  # fmt: skip
    assert schedule_from_diffusers(base) == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                             "beta_schedule": "linear", "objective": "v"}  # fmt: skip
    for change, field in (({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
                          ({"prediction_type": "sample"}, "prediction_type"),
                          ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
                          ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
                          ({"beta_end": None}, "beta_end")):  # fmt: skip
        with pytest.raises(ValueError, match=f"cfg.json: .*{field}"):
            schedule_from_diffusers({**base, **change}, "cfg.json")
    with caplog.at_level(logging.WARNING, logger="tta.pipelines.audioldm_import"):
        schedule_from_diffusers({**base, "clip_sample": True})
    assert "clip_sample" in caplog.text and "differ" in caplog.text
