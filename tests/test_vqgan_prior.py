"""The GPT2 prior over VQGAN codes (`vqgan_prior`) and the text-to-sound VQGAN pipeline: time-major code
order through the module, top-k / top-p filtering, KV-cache sampling, a tiny overfit regenerated greedily,
the three text-feature modes, the configs, and `tta fit` -> `tta pipeline export` -> `tta generate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import CONFIGS
from tests.hf_fixtures import wordpiece_tokenizer
from tta.generators.vqgan.network import SpectrogramVQGAN
from tta.generators.vqgan.prior import VQGANPriorModule, decay_groups
from tta.generators.vqgan.prior_text import PriorTextFeatures
from tta.nn.code_prior import GPT2CodePrior, filter_logits, next_codes
from tta.nn.quantize import VectorQuantizer, flatten_time_major, unflatten_time_major
from tta.utils.errors import UsageError

PRIOR_CONFIGS = ["vqgan_prior.yaml", "vqgan_prior_1feat.yaml", "vqgan_prior_nofeat.yaml", "demo/vqgan_prior.yaml"]


def bert_folder(folder: Path, width: int = 32, seed: int = 0) -> Path:
    """A tiny random BERT (1 layer) of hidden width ``width`` with a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    tok = wordpiece_tokenizer()
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_vqgan(num_codes: int = 32) -> SpectrogramVQGAN:
    """8x down on the demo mels (80 mels -> 10 code rows)."""
    torch.manual_seed(0)
    return SpectrogramVQGAN(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                            mid_attention=False, quantizer=VectorQuantizer(num_codes=num_codes, dim=4))


def tiny_prior(num_codes: int = 32, max_codes: int = 60, feature_dim: int = 8, prefix_length: int = 1,
               **kw: Any) -> GPT2CodePrior:
    torch.manual_seed(0)
    return GPT2CodePrior(num_codes=num_codes, max_codes=max_codes, feature_dim=feature_dim,
                         prefix_length=prefix_length, n_embd=32, n_layer=2, n_head=2, **kw)


# ----------------------------------------------------------------------------- code order
def test_time_major_round_trip_through_the_module(single_thread: None) -> None:
    module = VQGANPriorModule(tiny_prior(), vqgan=tiny_vqgan(), text_features="none", mel="demo")
    gen, vq = module.generator, module.vqgan
    mel = torch.randn(2, 80, 43)  # 43 frames -> padded to 48 -> 6 columns of 10 rows
    codes = gen.encode_codes(mel)
    assert codes.shape == (2, 60) and gen.rows == 10 and gen.codes_for(43) == 60
    from tta.generators.vae.codec import mel_to_image

    grid = vq.encode(mel_to_image(mel, 8, module.mel_config.log_floor)[0])[1]  # (B, time 6, freq 10)
    for t in range(6):
        for f in range(10):  # all rows of column t, then column t + 1 (the paper's column-major order)
            assert torch.equal(codes[:, t * 10 + f], grid[:, t, f])
    assert torch.equal(vq.sequence_to_indices(codes, 10), grid)
    assert torch.equal(unflatten_time_major(flatten_time_major(grid.transpose(1, 2)), 10), grid.transpose(1, 2))
    expected = vq.decode_indices(grid)[:, 0].transpose(1, 2)[..., :43]
    assert torch.equal(gen.decode_codes(codes, 43), expected)
    with pytest.raises(ValueError, match="codes must be"):
        gen.decode_codes(codes[:, :55])
    assert gen.max_duration == pytest.approx(6 * 8 * 256 / 22050) and gen.frames_for(0.55) == 48
    with pytest.raises(ValueError, match=r"need 8 code columns, but the prior was trained for at most 6 columns "
                                         r"\(max_codes 60 = 10 rows x 6\), i.e. 0.557"):
        gen.frames_for(0.7)


# ----------------------------------------------------------------------------- sampling
def test_top_k_and_top_p_never_sample_outside_their_sets(single_thread: None) -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.9, 2.5, -3.0, 1.2, 0.0, 1.9]])
    top4 = {5, 1, 9, 3}
    kept = filter_logits(logits, top_k=4)
    assert {int(i) for i in torch.isfinite(kept[0]).nonzero()} == top4
    assert torch.equal(kept[torch.isfinite(kept)], logits[0, sorted(top4)])  # survivors untouched
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([next_codes(logits.expand(500, -1), top_k=4, temperature=2.0, generator=g) for _ in range(4)])
    assert set(draws.tolist()) == top4  # every one of the top 4, nothing else
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]]).log()
    assert {int(i) for i in torch.isfinite(filter_logits(probs, top_p=0.75)[0]).nonzero()} == {0, 2}
    assert {int(i) for i in torch.isfinite(filter_logits(probs, top_p=0.1)[0]).nonzero()} == {0}
    assert int(next_codes(logits, greedy=True)) == 5 and int(next_codes(logits, top_k=1, generator=g)) == 5
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


def test_kv_cache_sampling_equals_uncached_and_seeds_are_per_row(single_thread: None) -> None:
    prior = tiny_prior(feature_dim=8, prefix_length=5, cfg_dropout=0.2).eval()
    feats = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for kw in ({"top_k": 8}, {"top_p": 0.9, "temperature": 1.3}, {"top_k": 16, "guidance": 2.5}):
        a = prior.sample(feats, 40, mask, generator=torch.Generator().manual_seed(7), **kw)
        b = prior.sample(feats, 40, mask, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
        assert a.shape == (3, 40) and torch.equal(a, b), kw
    # one generator per row: a row's codes do not depend on the rest of the batch
    both = prior.sample(feats[:2], 30, mask[:2], top_k=8, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = prior.sample(feats[1:2], 30, mask[1:2], top_k=8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(both[1:], alone)
    greedy = prior.sample(feats, 20, mask, greedy=True)
    assert torch.equal(prior(greedy, feats, mask).argmax(-1), greedy)  # teacher-forced argmax agrees
    with pytest.raises(ValueError, match="guidance 2.0 needs a prior trained with"):
        tiny_prior().sample(torch.randn(1, 1, 8), 4, guidance=2.0)
    with pytest.raises(ValueError, match="can sample 1..60 codes"):
        prior.sample(feats, 61, mask)


def test_prior_overfits_four_sequences_and_regenerates_them_greedily(tmp_path: Path, single_thread: None) -> None:
    from tta.encoders.text import BertTextEncoder

    text = PriorTextFeatures(BertTextEncoder(bert_folder(tmp_path / "bert"), max_length=8), "sequence", 8)
    captions = ["a dog barks", "rain falls on a roof", "a bell rings three times", "wind blows through the trees"]
    feats, mask = text(captions)
    prior = tiny_prior(num_codes=16, max_codes=12, feature_dim=32, prefix_length=8)
    codes = torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(decay_groups(prior, 0.0), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = prior.loss(codes, feats, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.05 < losses[0]
    prior.eval()
    feats, mask = text(captions)  # the frozen encoder gives the same features again
    assert torch.equal(prior.sample(feats, 12, mask, greedy=True), codes)
    assert torch.equal(prior.sample(feats[[2, 0]], 12, mask[[2, 0]], top_k=1), codes[[2, 0]])


# ----------------------------------------------------------------------------- text features
def test_text_feature_modes(tmp_path: Path, single_thread: None) -> None:
    from tta.encoders.text import BertTextEncoder

    enc = BertTextEncoder(bert_folder(tmp_path / "bert"), max_length=30, pooling="cls")
    caps = ["a dog barks", "a car passes by on a wet road"]
    seq, mask = PriorTextFeatures(enc, "sequence", 30)(caps)  # 30 Feats
    emb = enc(caps)
    n = emb.seq.shape[1]
    assert seq.shape == (2, 30, 32) and mask.shape == (2, 30) and torch.equal(mask[:, :n], emb.mask)
    assert not mask[:, n:].any() and (seq[:, n:] == 0).all() and torch.equal(seq[:, :n], emb.seq)
    memo = PriorTextFeatures(enc, "sequence", 30, memo=2)
    for batch in (caps, caps[::-1], ["rain falls", caps[0], caps[0]]):
        got, got_mask = memo(batch)
        want, want_mask = PriorTextFeatures(enc, "sequence", 30)(batch)
        assert torch.equal(got_mask, want_mask) and torch.allclose(got, want, atol=1e-5)
    assert list(memo._memo) == ["rain falls", caps[0]]  # least recently used dropped first
    pooled, pmask = PriorTextFeatures(enc, "pooled", 30)(caps)  # 1 Feat: the [CLS] state
    assert pooled.shape == (2, 1, 32) and pmask.all() and torch.equal(pooled[:, 0], emb.seq[:, 0])
    nofeat = PriorTextFeatures(None, "none", dim=24, seed=1)  # No Feat
    a, amask = nofeat(caps)
    b, _ = nofeat(["something else entirely", "x", "y"])
    assert a.shape == (2, 1, 24) and amask.all() and torch.equal(a[0], a[1]) and torch.equal(a[0], b[2])
    assert torch.equal(a, PriorTextFeatures(None, "none", dim=24, seed=1)(caps)[0])  # the seed fixes it
    with pytest.raises(ValueError, match="max_length is 30 but the prior reads at most 8"):
        PriorTextFeatures(enc, "sequence", 8)
    from tta.generators.vqgan.prior_text import _cap_tokens

    tower = argparse.Namespace(encoder=argparse.Namespace(max_length=77))  # a CLAP text tower's layout
    _cap_tokens(tower, 30)
    assert tower.encoder.max_length == 30
    with pytest.raises(ValueError, match="reads no text"):
        PriorTextFeatures(enc, "none", dim=4)
    with pytest.raises(ValueError, match="text_features must be one of"):
        PriorTextFeatures(enc, "tokens")
    # the module refuses a prior whose prefix or widths do not fit, by name
    with pytest.raises(ValueError, match="prior.prefix_length 1 != the text prefix length 30"):
        VQGANPriorModule(tiny_prior(feature_dim=32), vqgan=tiny_vqgan(), text_encoder=enc, mel="demo")
    with pytest.raises(ValueError, match="prior.num_codes 64 != the VQGAN's codebook size 32"):
        VQGANPriorModule(tiny_prior(num_codes=64), vqgan=tiny_vqgan(), text_features="none", mel="demo")
    with pytest.raises(ValueError, match="max_codes 55 is not a whole number of code columns of 10 rows"):
        VQGANPriorModule(tiny_prior(max_codes=55), vqgan=tiny_vqgan(), text_features="none", mel="demo")


# ----------------------------------------------------------------------------- configs
def vqgan_checkpoint(path: Path, vqgan_config: str) -> Path:
    """A VQGAN checkpoint with the interface (mel, codebook size, downsampling) of ``vqgan_config``,
    shrunk in depth and width only, written as `tta fit` writes one (no training)."""
    from tests.ldm_fixtures import build_module, write_checkpoint

    if path.is_file():
        return path
    args = yaml.safe_load((CONFIGS / vqgan_config).read_text())["model"]["init_args"]
    ae = args["autoencoder"]
    ae["init_args"].update(ch=4, num_res_blocks=1, attn_resolutions=[], mid_attention=False)
    config = {"class_path": "vqgan", "init_args": {"autoencoder": ae, "mel": args["mel"]}}
    return write_checkpoint(build_module(config), config, path)


def config_overrides(path: Path, tmp_path: Path) -> list[str]:
    """CLI overrides that let a ``vqgan_prior`` config instantiate: a VQGAN checkpoint of its paired
    VQGAN config, a tiny text-encoder folder of the width it declares, a 1-layer GPT2 (depth and
    width only: no interface width is changed)."""
    model = yaml.safe_load(path.read_text())["model"]["init_args"]
    demo = path.parent.name == "demo"
    ckpt = vqgan_checkpoint(tmp_path / ("demo_vqgan.ckpt" if demo else "vqgan.ckpt"),
                            "demo/vqgan.yaml" if demo else "vqgan.yaml")
    out = [f"--model.init_args.vqgan_checkpoint={ckpt}"]
    if not demo:
        out += ["--model.init_args.prior.init_args.n_layer=1", "--model.init_args.prior.init_args.n_embd=32"]
        if model.get("text_encoder"):
            width = model["prior"]["init_args"]["feature_dim"]
            folder = bert_folder(tmp_path / f"bert{width}", width)
            out.append(f"--model.init_args.text_encoder.init_args.path={folder}")
    return out


def test_paper_configs_follow_the_paper_and_vqgan_yaml_feeds_them(single_thread: None) -> None:
    from tta.data.mel import MelFrontend
    from tta.generators.vqgan.prior_generator import CodePriorGenerator
    from tta.training.loading import build_network

    vq_args = yaml.safe_load((CONFIGS / "vqgan.yaml").read_text())["model"]["init_args"]
    ae = dict(vq_args["autoencoder"])
    ae["init_args"] = {**ae["init_args"], "ch": 4, "num_res_blocks": 1, "attn_resolutions": []}
    vqgan = build_network(ae)
    modes = {"vqgan_prior.yaml": ("sequence", 30), "vqgan_prior_1feat.yaml": ("pooled", 1),
             "vqgan_prior_nofeat.yaml": ("none", 1)}
    for name, (mode, prefix) in modes.items():
        config = yaml.safe_load((CONFIGS / name).read_text())
        args, prior = config["model"]["init_args"], config["model"]["init_args"]["prior"]["init_args"]
        assert args["text_features"] == mode and prior["prefix_length"] == prefix and args["top_k"] == 512
        assert (prior["num_codes"], prior["max_codes"], prior["n_embd"], prior["n_layer"], prior["n_head"]) == (
            1024, 250, 1024, 24, 16)
        assert args["mel"] == vq_args["mel"] == config["data"]["init_args"]["mel"] == "vqgan"
        assert (args.get("text_encoder") is None) == (mode == "none")
        assert prior["prefix_length"] == (args["text_length"] if mode == "sequence" else 1)
        net = GPT2CodePrior(**{**prior, "n_layer": 1, "n_embd": 32, "prefix_length": 1})
        gen = CodePriorGenerator(MelFrontend("vqgan"), vqgan, PriorTextFeatures(None, "none", dim=prior["feature_dim"]),
                                 net, {})
        seconds = config["data"]["init_args"]["segment_seconds"]
        assert gen.rows == 5 and gen.codes_for(gen.frames_for(seconds)) == 250 and gen.max_duration == 10.0


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_configs_are_covered_by_the_every_config_test(name: str) -> None:
    from tests import test_cli

    assert CONFIGS / name in test_cli.ALL_CONFIGS
    source = Path(test_cli.__file__).read_text()
    assert "test_vqgan_prior import config_overrides" in source  # test_every_config_instantiates uses it


def test_demo_config_trains_a_step_and_logs_loss_and_accuracy(tiny_synth: Path, tmp_path: Path,
                                                              single_thread: None) -> None:
    from tta.cli import build_cli

    path = CONFIGS / "demo" / "vqgan_prior.yaml"
    cli = build_cli(["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=1",
                     "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.logger=false",
                     *config_overrides(path, tmp_path), f"--data.init_args.manifest={tiny_synth}",
                     "--data.init_args.batch_size=4"], run=False)
    model = cli.model
    assert model.vqgan.num_codes == 128 and not any(p.requires_grad for p in model.vqgan.parameters())
    before = {k: v.clone() for k, v in model.vqgan.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/code_accuracy"} <= set(metrics)
    assert 0.0 <= float(metrics["val/code_accuracy"]) <= 1.0 and float(metrics["val/loss"]) > 0
    assert all(torch.equal(v, model.vqgan.state_dict()[k]) for k, v in before.items())  # frozen, no EMA/restarts
    assert model.generator.max_columns == 11 and len(model._codes_cache) == 4  # 1 s segments, cached
    model.eval()
    wav = model.generate_for_eval(["a dog barks"], ["x"], 0.5)  # the eval_metrics callback's hook
    assert wav.shape == (1, round(0.5 * 22050)) and torch.isfinite(wav).all()
    shown = model.demo_outputs({"mel": torch.randn(2, 80, 43), "caption": ["a dog", "rain"], "id": ["a", "b"]})
    assert {k: tuple(v.shape) for k, v in shown.items()} == {k: (2, 80, 43) for k in ("input", "codes", "generated")}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_fit_export_generate_end_to_end(tiny_synth: Path, tmp_path: Path, single_thread: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """configs/vqgan.yaml (1 step) feeds configs/vqgan_prior.yaml (1 step, depth/size shrunk only);
    export with Griffin-Lim; `tta generate` with the pipeline's default duration (10 s)."""
    from tta.cli import main
    from tta.pipelines import load_pipeline
    from tta.pipelines.vqgan import VQGANPipeline

    def one_step(root: Path) -> list[str]:
        ck = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"dirpath": str(root / "ck"), "save_last": True}}
        return [f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.precision=32-true", "--trainer.max_steps=1", "--trainer.num_sanity_val_steps=0",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.callbacks=[{json.dumps(ck)}]",
                f"--data.init_args.manifest={tiny_synth}", "--data.init_args.segment_seconds=1.0",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]

    ae = "--model.init_args.autoencoder.init_args."
    assert main(["fit", "--config", str(CONFIGS / "vqgan.yaml"), *one_step(tmp_path / "vq"), f"{ae}ch=4",
                 f"{ae}num_res_blocks=1", f"{ae}attn_resolutions=[]", "--model.init_args.discriminator.init_args.ndf=4",
                 "--model.init_args.discriminator.init_args.n_layers=1"]) == 0
    vq_ckpt = tmp_path / "vq" / "ck" / "last.ckpt"
    prior = "--model.init_args.prior.init_args."
    assert main(["fit", "--config", str(CONFIGS / "vqgan_prior.yaml"), *one_step(tmp_path / "prior"),
                 f"--model.init_args.vqgan_checkpoint={vq_ckpt}", f"{prior}n_layer=1", f"{prior}n_embd=32",
                 f"--model.init_args.text_encoder.init_args.path={bert_folder(tmp_path / 'bert768', 768)}"]) == 0
    pipe_dir = tmp_path / "pipe"
    assert main(["pipeline", "export", str(tmp_path / "prior" / "ck" / "last.ckpt"), "--out", str(pipe_dir),
                 "--vocoder", "griffinlim"]) == 0
    meta = json.loads((pipe_dir / "pipeline.json").read_text())
    assert meta["kind"] == "vqgan_prior" and "vqgan_checkpoint" not in meta["model"]["init_args"]
    assert meta["defaults"]["duration"] == 10.0 and meta["defaults"]["top_k"] == 512 and "steps" not in meta["defaults"]
    assert {p.name for p in pipe_dir.iterdir()} >= {"prior.safetensors", "vqgan.safetensors",
                                                    "text_encoder.safetensors", "vocoder.safetensors"}
    vq_ckpt.unlink()  # the folder is self-contained apart from the text encoder's folder
    out = tmp_path / "out"
    assert main(["generate", "food is frying and a woman talks", "--pipeline", str(pipe_dir), "--out", str(out),
                 "--allow-silent"]) == 0
    row = json.loads((out / "generations.jsonl").read_text())
    assert row["duration"] == pytest.approx(10.0) and row["sample_rate"] == 32000
    assert row["generation"]["steps"] == 250 and row["generation"]["codes"] == 250
    assert row["generation"]["top_k"] == 512 and row["generation"]["sampler"] == "top_k"
    capsys.readouterr()
    assert main(["generate", "a dog", "--pipeline", str(pipe_dir), "--out", str(tmp_path / "bad"), "--steps", "5"]) == 2
    assert "steps=5: the VQGAN pipeline has no sampling steps" in capsys.readouterr().err
    pipe = load_pipeline(pipe_dir)
    assert isinstance(pipe, VQGANPipeline) and pipe.max_duration == 10.0
    kw = {"duration": 0.5, "seed": [3], "top_k": 1, "allow_silent": True}
    a, b = pipe.generate(["a dog barks"], **kw), pipe.generate(["a dog barks"], **kw)
    assert torch.equal(a.wav, b.wav) and a.wav.shape == (1, 16000) and a.settings["steps"] == 15  # 40 frames: 3 columns x 5 rows
    with pytest.raises(UsageError, match=r"duration must be <= 10 \(the pipeline's max_duration\)"):
        pipe.generate(["a dog"], duration=10.5)
    with pytest.raises(ValueError, match="guidance 3.0 needs a prior trained with"):
        pipe.generate(["a dog"], duration=0.5, guidance=3.0)
    with pytest.raises(UsageError, match="sampler 'ddim'"):
        pipe.generate(["a dog"], duration=0.5, sampler="ddim")
    from tta.pipelines.commands import _parser, _system_inputs

    args = _parser().parse_args(["a dog", "--pipeline", str(pipe_dir), "--top-k", "4", "--temperature", "0.5"])
    assert _system_inputs(args, pipe) == {"top_k": 4, "temperature": 0.5}


def test_code_sampling_options_are_refused_for_other_pipelines(tmp_path: Path) -> None:
    from tta.pipelines.commands import _parser, _system_inputs, check_arguments

    args = _parser().parse_args(["a dog", "--pipeline", str(tmp_path), "--top-k", "4"])
    check_arguments(args)
    with pytest.raises(UsageError, match="samples no codes"):
        _system_inputs(args, argparse.Namespace(generator=None))
    with pytest.raises(UsageError, match="--temperature must be > 0"):
        check_arguments(_parser().parse_args(["a dog", "--pipeline", str(tmp_path), "--temperature", "0"]))
