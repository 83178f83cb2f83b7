"""CLAP captioning: caption-only loss, greedy/beam decoding, overfit, module, configs."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.conftest import CONFIGS
from tests.hf_fixtures import CORPUS, make_bert_folder, make_gpt2_folder
from tta.data.manifest import read_manifest
from tta.encoders.clap.caption_module import ClapCaptionModule
from tta.encoders.clap.captioner import ClapCaptioner, beam_search, greedy_search
from tta.encoders.clap.network import CLAP
from tta.encoders.htsat import HTSAT
from tta.encoders.text import BertTextEncoder
from tta.metrics.captioning import caption_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_HTSAT = {"dim": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4,
              "spec_frames": 64, "freq_ratio": 4, "drop_path": 0.0, "window_seconds": 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caption_hf")
    return {"gpt2": make_gpt2_folder(root / "gpt2"), "bert": make_bert_folder(root / "bert")}


def tiny_clap(bert: Path, mel_preset: str = "demo", seed: int = 0) -> CLAP:
    torch.manual_seed(seed)
    audio = HTSAT(**TINY_HTSAT, mel_preset=mel_preset)
    return CLAP(audio, BertTextEncoder(bert, max_length=16), joint_dim=16, dropout=0.0)


def tiny_captioner(folders: dict[str, Path], **kw: object) -> ClapCaptioner:
    args: dict[str, object] = {
        "lm": str(folders["gpt2"]),
        "clap": tiny_clap(folders["bert"]),
        "prefix_length": 4,
        "clip_length": 4,
        "mapper_layers": 1,
        "mapper_heads": 2,
        "max_caption_tokens": 16,
    }
    args.update(kw)
    torch.manual_seed(1)
    return ClapCaptioner(**args)  # type: ignore[arg-type]


def tones(freqs: list[float], sr: int = 22050, seconds: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(sr * seconds)) / sr
    return torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in freqs])


# ------------------------------------------------------------------------------------- loss
def test_loss_counts_caption_tokens_only(folders: dict[str, Path]) -> None:
    cap = tiny_captioner(folders).eval()
    wav, captions = tones([300.0, 900.0]), ["a dog barks", "rain falls on a roof in the morning"]
    ids, mask = cap.tokenize(captions)
    eos = cap.eos_id
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] and ids[0, lengths[0] - 1] == eos and ids[1, lengths[1] - 1] == eos
    prefix = cap.prefix(wav)
    loss = cap.loss(prefix, ids, mask)
    # reference: each caption alone (no padding), token log-likelihood after the prefix
    wte = cap.lm.get_input_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, n in enumerate(lengths):
            row = ids[i : i + 1, :n]
            logits = cap.lm(inputs_embeds=torch.cat([prefix[i : i + 1], wte(row)], dim=1)).logits[0]
            logp = F.log_softmax(logits[prefix.shape[1] - 1 : prefix.shape[1] - 1 + n], dim=-1)
            total -= float(logp[torch.arange(n), row[0]].sum())
            count += n
    assert count == int(mask.sum())
    torch.testing.assert_close(loss, torch.tensor(total / count), atol=1e-5, rtol=1e-5)
    # whatever sits in the padding does not matter
    other = ids.masked_fill(~mask, 7)
    torch.testing.assert_close(cap.loss(prefix, other, mask), loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cap(wav, captions), loss, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"captions \[1\] are empty"):
        cap(wav, ["a dog barks", "  "])


# ---------------------------------------------------------------------------------- decoding
def bigram_step(table: torch.Tensor, start: torch.Tensor) -> object:
    """A hand-made LM: log p(next | last token), ``start`` for the first token."""

    def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] == 0:
            return start.log().expand(rows.shape[0], -1)
        return table[tokens[:, -1]].log()

    return step


def brute_force(table: torch.Tensor, start: torch.Tensor, eos: int, max_len: int, alpha: float) -> list[int]:
    """The best sequence over all sequences (EOS-terminated, or cut at ``max_len``)."""
    vocab = [v for v in range(start.shape[0]) if v != eos]
    best, best_score = None, -math.inf
    for n in range(max_len + 1):
        for body in itertools.product(vocab, repeat=n):
            for ends in [True, False] if n == max_len else [True]:
                if ends and n == max_len:
                    continue
                seq = list(body) + ([eos] if ends else [])
                probs = [start[seq[0]]] + [table[a, b] for a, b in itertools.pairwise(seq)] if seq else []
                if not seq:
                    continue
                score = sum(math.log(float(p)) for p in probs) / len(seq) ** alpha
                if score > best_score:
                    best, best_score = list(body), score
    assert best is not None
    return best


def test_beam_search_finds_the_best_sequence_greedy_misses() -> None:
    eos = 0  # tokens: 0 = EOS, 1 = "a", 2 = "b"
    start = torch.tensor([0.0, 0.6, 0.4])
    table = torch.tensor([[1.0, 0.0, 0.0], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05]])
    table = table.clamp_min(1e-12)
    start = start.clamp_min(1e-12)
    step = bigram_step(table, start)
    assert greedy_search(step, 1, 5, eos) == [[1]]  # a, EOS: p = 0.6 * 0.34 = 0.204
    assert beam_search(step, 1, 5, eos, beam_size=1) == [[1]]
    assert beam_search(step, 1, 5, eos, beam_size=2) == [[2]]  # b, EOS: p = 0.4 * 0.9 = 0.36
    # exhaustive beams equal the brute-force optimum, for raw and length-normalised scores
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        table = torch.rand(4, 4, generator=g) + 0.05
        table = table / table.sum(1, keepdim=True)
        start = torch.rand(4, generator=g) + 0.05
        start = start / start.sum()
        for alpha in (0.0, 1.0):
            got = beam_search(bigram_step(table, start), 1, 3, eos, beam_size=100, length_penalty=alpha)
            assert got == [brute_force(table, start, eos, 3, alpha)], (trial, alpha)


def test_greedy_equals_beam_size_one(folders: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):  # random bigram LMs, several batch items
        table = torch.softmax(3 * torch.randn(6, 6, generator=g), dim=1)
        start = torch.softmax(3 * torch.randn(6, generator=g), dim=0)
        step = bigram_step(table, start)
        assert beam_search(step, 3, 8, 0, beam_size=1) == greedy_search(step, 3, 8, 0)
    cap = tiny_captioner(folders).eval()
    wav = tones([200.0, 500.0, 1200.0])
    with torch.no_grad():
        step = cap._step_fn(cap.prefix(wav))
        greedy = greedy_search(step, 3, 12, cap.eos_id)
        assert beam_search(step, 3, 12, cap.eos_id, beam_size=1) == greedy
    assert cap.generate_tokens(wav, max_len=12) == greedy
    assert cap.generate(wav, max_len=12) == [cap.decode(t) for t in greedy]
    beams = cap.generate(wav, max_len=12, beam_size=3)
    assert beams == cap.generate(wav, max_len=12, beam_size=3) and len(beams) == 3  # deterministic


# ----------------------------------------------------------------------------------- overfit
def test_overfit_four_clips_reproduces_captions(folders: dict[str, Path]) -> None:
    cap = tiny_captioner(folders, mapper="mlp", train_lm=True)
    wav = tones([220.0, 550.0, 1300.0, 3100.0])
    captions = [CORPUS[0], CORPUS[3], CORPUS[4], CORPUS[8]]
    params = [p for p in cap.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in cap.audio_encoder.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    cap.train()
    losses = []
    for _ in range(120):
        loss = cap(wav, captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], losses[::20]
    assert cap.training and not cap.audio_encoder.training and not cap.audio_projection.training
    assert cap.generate(wav, max_len=16) == captions
    assert cap.generate(wav, max_len=16, beam_size=3) == captions


# ------------------------------------------------------------------------------------ metrics
def test_references_are_every_caption_with_fallback_to_the_batch_caption() -> None:
    batch = {"id": ["a", "b", "c", "d"], "caption": ["x one", "y two", "z", "w"],
             "captions": [["x one", "x alt", " ", "?!"], [], ["z"], ["w", "w2"]]}  # fmt: skip
    assert ClapCaptionModule.references(batch, [0, 1, 2]) == [["x one", "x alt"], ["y two"], ["z"]]
    assert ClapCaptionModule.references(batch, [3]) == [["w", "w2"]]
    del batch["captions"]
    assert ClapCaptionModule.references(batch, [0, 1]) == [["x one"], ["y two"]]
    bad = {"id": ["clip9"], "caption": ["?!"], "captions": [["", "!"]]}
    with pytest.raises(ValueError, match=r"clip clip9: no caption with words to score against: \['', '!'\]"):
        ClapCaptionModule.references(bad, [0])


# ------------------------------------------------------------------------------ module, configs
def make_clap_checkpoint(path: Path, bert: Path, mel: str = "msclap") -> Path:
    """A ``clap_trainer`` checkpoint of a tiny CLAP, with its config, as ``tta fit`` writes it."""
    from tta.training.loading import build_model

    htsat = dict(TINY_HTSAT, mel_preset=mel, mel={"n_mels": 32})
    config = {"class_path": "clap_trainer", "init_args": {"mel": mel, "clap": {"class_path": "clap", "init_args": {
        "joint_dim": 16, "dropout": 0.0, "audio_encoder": {"class_path": "htsat", "init_args": htsat},
        "text_encoder": {"class_path": "bert_text", "init_args": {"path": str(bert), "max_length": 16}}}}}}  # fmt: skip
    torch.manual_seed(0)
    module = build_model(config)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    ckpt["tta"]["config"] = yaml.safe_dump({"model": config})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def config_overrides(tmp_path: Path) -> list[str]:
    """CLI overrides that let ``configs/clap_caption.yaml`` instantiate with tiny local weights."""
    bert = make_bert_folder(tmp_path / "bert")
    root = "--model.init_args.captioner.init_args."
    return [
        f"{root}lm={make_gpt2_folder(tmp_path / 'gpt2')}",
        f"{root}clap_checkpoint={make_clap_checkpoint(tmp_path / 'clap.ckpt', bert)}",
        f"{root}prefix_length=8", f"{root}clip_length=8", f"{root}max_caption_tokens=16",
    ]  # fmt: skip


def test_configs_instantiate_and_clap_comes_from_checkpoint(tmp_path: Path) -> None:
    from tta.cli import build_cli

    paper = build_cli(["--config", str(CONFIGS / "clap_caption.yaml"), f"--trainer.default_root_dir={tmp_path}",
                       *config_overrides(tmp_path)], run=False)  # fmt: skip
    cap = paper.model.captioner
    assert isinstance(paper.model, ClapCaptionModule) and paper.model.mel_config == paper.datamodule.mel_config
    assert cap.audio_encoder.frozen and cap.joint_dim == 16 and cap.prefix_length == 8
    assert len(cap.mapper.transformer.layers) == 8 and not any(p.requires_grad for p in cap.lm.parameters())
    # the audio tower is the checkpoint's, weight for weight
    ckpt = torch.load(tmp_path / "clap.ckpt", weights_only=True)["state_dict"]
    for k, v in cap.audio_encoder.state_dict().items():
        assert torch.equal(v, ckpt[f"clap.audio_encoder.{k}"]), k
    demo = build_cli(["--config", str(CONFIGS / "demo" / "clap_caption.yaml"),
                      f"--trainer.default_root_dir={tmp_path}"], run=False)  # fmt: skip
    assert demo.model.captioner.vocab == 257 and demo.model.captioner.train_lm
    with pytest.raises(ValueError, match="exactly one of `clap`"):
        ClapCaptioner(lm=str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="exceeds the 64 positions"):
        ClapCaptioner(lm=str(tmp_path / "gpt2"), clap_checkpoint=str(tmp_path / "clap.ckpt"), prefix_length=40)
    with pytest.raises(ValueError, match="expects 44100 Hz but mel preset 'demo'"):
        ClapCaptionModule(cap, mel="demo")


def test_demo_config_fast_dev_run_and_test_metrics(tiny_synth: Path, tmp_path: Path) -> None:
    import lightning as L

    from tta.cli import build_cli

    args = ["--config", str(CONFIGS / "demo" / "clap_caption.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.manifest={tiny_synth}", "--data.init_args.batch_size=4",
            "--data.init_args.segment_seconds=1.0", "--trainer.enable_progress_bar=false",
            "--model.init_args.max_len=8", "--model.init_args.val_captions=2",
            "--model.init_args.val_metrics=true"]  # fmt: skip
    cli = build_cli(args, run=False)  # the demo config as `tta fit` parses it
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [set(s) for s in cli.model.val_samples] == [{"id", "reference", "generated"}] * 2
    # with val_metrics, greedy captions of every validation clip are scored as the test set is
    assert {"val/cider_d", "val/bleu4", "val/rougeL", "val/exact", "val/n_clips"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["val/n_clips"] == 4
    metrics = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    names = {"cider_d", "bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "exact"}
    assert set(metrics) == {"test/loss", "test/n_clips"} | {f"test/{k}" for k in names}
    assert all(0.0 <= metrics[f"test/{k}"] <= 1.0 for k in names - {"cider_d"}) and metrics["test/cider_d"] >= 0.0
    assert metrics["test/n_clips"] == 4 and math.isfinite(metrics["test/loss"])
    # the references are every caption of each clip (the manifest's), scored as one corpus
    captions = {item.id: item.captions for item in read_manifest(tiny_synth)}
    samples = cli.model.test_samples
    assert len(samples) == 4 and all(s["references"] == captions[s["id"]] for s in samples)
    assert any(len(s["references"]) > 1 for s in samples), "the test clips should have several captions"
    expected = caption_metrics([s["generated"] for s in samples], [s["references"] for s in samples])
    assert {k: metrics[f"test/{k}"] for k in names} == pytest.approx(expected, abs=1e-6)
    # a caption equal to the *last* reference of each clip is exact only if every caption is a reference
    order = [s["id"] for s in samples]  # the test loader's order, which is deterministic
    last = {s["id"]: s["references"][-1] for s in samples}
    cli.model.generate = lambda wav, beam_size=1: [last[i] for i in order]  # type: ignore[method-assign]
    metrics = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert metrics["test/exact"] == 1.0 and metrics["test/bleu1"] == 1.0 and metrics["test/rougeL"] == 1.0
    single = caption_metrics([last[i] for i in order], [captions[i][0] for i in order])
    assert single["exact"] < 1.0 and single["cider_d"] < metrics["test/cider_d"]
