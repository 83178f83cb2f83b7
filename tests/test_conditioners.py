"""Conditioners as a generic named set: a plugin conditioner configured by YAML alone, guidance
dropping any subset by name, per-conditioner dropout, route/width checks, missing inputs, concat."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from tests.hf_fixtures import make_bert_folder
from tests.ldm_fixtures import CLAP_DIM, CTX_DIM, build, make_store_and_table, tiny_clap_config, tiny_unet_config
from tta import registry
from tta.generators.conditioning import ConditionedModel, Conditioner, MissingInputError
from tta.generators.ldm.conditioning import ClapTextFiLM
from tta.generators.ldm.model import LatentDiffusion
from tta.generators.ldm.retrieval import RetrievalConditioner

PLUGIN = "tta_test_conditioner_plugin"
PLUGIN_BODY = '''"""A third-party conditioner: a learned embedding per clip id (hashed into buckets)."""
import zlib

import torch
from torch import nn

from tta.generators.conditioning import Conditioner
from tta.registry import register


@register("conditioner", "id_context")
class IdContext(Conditioner):
    route = "context"
    reads = ("id",)

    def __init__(self, buckets: int = 8, dim: int = 16, tokens: int = 2, dropout: float | None = None) -> None:
        super().__init__(dropout)
        self.buckets, self.dim, self.tokens = buckets, dim, tokens
        self.table = nn.Embedding(buckets, tokens * dim)

    def encode(self, inputs, device):
        rows = torch.tensor([zlib.crc32(str(i).encode()) % self.buckets for i in inputs["id"]], device=device)
        seq = self.table(rows).view(len(rows), self.tokens, self.dim)
        return seq, torch.ones(len(rows), self.tokens, dtype=torch.bool, device=device)
'''


class HashFiLM(Conditioner):
    """Captions -> a fixed pseudo-random vector per caption length; a learned null."""

    route = "film"
    reads = ("captions",)

    def __init__(self, dim: int = CLAP_DIM, dropout: float | None = None) -> None:
        super().__init__(dropout)
        self.dim = dim
        self.null = nn.Parameter(torch.randn(dim, generator=torch.Generator().manual_seed(9)))

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        return torch.stack([torch.randn(self.dim, generator=torch.Generator().manual_seed(len(c)))
                            for c in inputs["captions"]]).to(device)

    def null_value(self, value: torch.Tensor) -> torch.Tensor:
        return self.null.to(value.device, value.dtype).expand_as(value)


class Tokens(Conditioner):
    """A learned context of ``tokens`` vectors per row, on a configurable route."""

    reads = ("captions",)

    def __init__(self, dim: int = CTX_DIM, tokens: int = 3, route: str = "context", dropout: float | None = None) -> None:
        super().__init__(dropout, route)  # type: ignore[arg-type]
        self.dim, self.tokens = dim, tokens
        self.seq = nn.Parameter(torch.randn(tokens, dim, generator=torch.Generator().manual_seed(4)))

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(inputs["captions"])
        return self.seq.expand(b, -1, -1).to(device), torch.ones(b, self.tokens, dtype=torch.bool, device=device)


class MapConcat(Conditioner):
    """Given maps ``(B, C, H, W)`` times a learned gain, concatenated to the latents."""

    route = "concat"
    reads = ("maps",)

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.dim = channels
        self.gain = nn.Parameter(torch.tensor(1.5))

    def encode(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        return inputs["maps"].to(device) * self.gain


def unet(**overrides: Any) -> nn.Module:
    cfg = tiny_unet_config()
    cfg["init_args"].update(overrides)
    torch.manual_seed(0)
    return build(cfg)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_folder(tmp_path_factory.mktemp("bert"))


# --------------------------------------------------------------------------- plugin, by config alone
def _install_plugin(root: Path) -> None:
    (root / f"{PLUGIN}.py").write_text(PLUGIN_BODY)
    dist = root / f"{PLUGIN}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[tta.plugins]\n{PLUGIN} = {PLUGIN}\n")


def _plugin_config(tmp_path: Path, bert: Path, manifest: Path) -> Path:
    from tests.ldm_fixtures import tiny_vae_config

    unet_cfg = tiny_unet_config()
    unet_cfg["init_args"]["context_dims"] = {"extra": 16}
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "latent_diffusion", "init_args": {
            "mel": "demo", "unet": unet_cfg, "vae": tiny_vae_config(), "scale_factor": 1.0,
            "clap": tiny_clap_config(bert), "lr": 1.0e-3, "cfg_dropout": 0.1,
            "conditioners": {"extra": {"class_path": "id_context", "init_args": {"buckets": 8, "dim": 16}}},
        }},
        "data": {"class_path": "audio", "init_args": {"manifest": str(manifest), "mel": "demo",
                                                        "segment_seconds": 0.5, "batch_size": 4}},
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_plugin_conditioner_trains_from_config_alone(tmp_path: Path, bert: Path, tiny_synth: Path,
                                                     monkeypatch: pytest.MonkeyPatch, single_thread: None) -> None:
    """A conditioner published through the ``tta.plugins`` entry point, routed to a cross-attention
    context ``extra`` by YAML alone, conditions the UNet and is trained by the module's step."""
    from tta.cli import build_cli

    _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._loaded, "plugins", False)
    try:
        cli = build_cli(["--config", str(_plugin_config(tmp_path, bert, tiny_synth))], run=False)
        module = cli.model
        extra = module.model.extra
        assert type(extra).__module__ == PLUGIN and extra.name == "extra" and extra.route == "context"
        assert module.model.conditioner_names == ("text", "extra") and module.model.retrieval is None
        assert extra.dropout == 0.1  # from the module's cfg_dropout
        assert "model.extra.table.weight" in module.state_dict()
        with torch.no_grad():  # a trained cross-attention (its output projection starts at zero)
            for name, p in module.model.unet.named_parameters():
                if ".extra." in name and "to_out" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))

        cli.datamodule.setup("fit")
        batch = next(iter(cli.datamodule.train_dataloader()))
        seen: list[dict[str, Any]] = []
        hook = module.model.unet.register_forward_hook(lambda _m, _a, kw, _o: seen.append(kw["context"]),
                                                       with_kwargs=True)
        try:
            latents = module.codec.encode(batch["mel"].float(), generator=torch.Generator().manual_seed(0))
            no_drop = {n: torch.zeros(len(batch["id"]), dtype=torch.bool) for n in module.model.conditioner_names}
            loss = module.model.loss(latents, module.condition_inputs(batch), drop=no_drop,
                                     generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        assert torch.isfinite(loss) and set(seen[0]) == {"extra"} and seen[0]["extra"][0].shape[1:] == (2, 16)
        loss.backward()
        assert extra.table.weight.grad is not None and extra.table.weight.grad.abs().sum() > 0
        module.zero_grad()

        before = extra.table.weight.detach().clone()
        cli.trainer.fit(module, datamodule=cli.datamodule)  # one step, the batch's "id" read by the plugin
        assert module.batches_trained == 1
        assert not torch.equal(extra.table.weight, before)
        with pytest.raises(MissingInputError, match=r"'extra'.*\['id'\]"):
            module.model.conditioning(["a dog barks"])

        from tta.pipelines.ldm import TextToAudioPipeline  # the pipeline passes the plugin its inputs
        from tta.vocoders.factory import build_vocoder

        pipe = TextToAudioPipeline(module.generator, build_vocoder("griffinlim", module.mel_config), {"steps": 2})
        a, b = (pipe.generate(["a dog barks"], duration=0.3, seed=0, allow_silent=True,
                              conditioner_inputs={"id": [clip]}).mel for clip in ("clip-a", "clip-b"))
        assert a.shape == b.shape and not torch.equal(a, b)
        with pytest.raises(MissingInputError, match=r"'extra'.*\['id'\]"):
            pipe.generate(["a dog barks"], duration=0.3)
        with pytest.raises(ValueError, match=r"conditioner_inputs\['id'\] has 2 entries for 1 prompts"):
            pipe.generate(["a dog barks"], duration=0.3, conditioner_inputs={"id": ["x", "y"]})
    finally:
        registry._REGISTRY["conditioner"].pop("id_context", None)
        sys.modules.pop(PLUGIN, None)


# --------------------------------------------------------------------------- guidance and dropout
def test_guidance_drops_any_subset_by_name(bert: Path, tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(6)]
    features, index = make_store_and_table(ids, tmp_path)
    torch.manual_seed(0)
    text = ClapTextFiLM(build(tiny_clap_config(bert)))
    with torch.no_grad():
        text.null.normal_()
    retrieval = RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM)
    model = LatentDiffusion(unet(context_dims={"retrieval": CTX_DIM}), {"text": text, "retrieval": retrieval})
    captions = ["a dog barks", "rain falls"]
    cond = model.conditioning(captions, retrieval.training_neighbours(ids[:2]))
    seq, mask = cond.context["retrieval"]
    assert mask.any()

    only_retrieval = model.unconditional(cond, drop=["retrieval"])
    assert torch.equal(only_retrieval.film, cond.film)  # the prompt's FiLM is kept
    assert torch.equal(only_retrieval.context["retrieval"][0], seq) and not only_retrieval.context["retrieval"][1].any()
    only_text = model.unconditional(cond, drop="text")
    torch.testing.assert_close(only_text.film, text.null.expand(2, -1))
    assert torch.equal(only_text.context["retrieval"][1], mask)
    both = model.unconditional(cond)
    assert torch.equal(both.film, only_text.film) and not both.context["retrieval"][1].any()
    assert torch.equal(model.unconditional(cond, drop=[]).film, cond.film)

    with pytest.raises(ValueError, match=r"unknown conditioner\(s\) \['image'\].*\['text', 'retrieval'\]"):
        model.unconditional(cond, drop=["retrieval", "image"])
    with pytest.raises(ValueError, match="unknown conditioner"):
        model.sample(cond, (4, 8, 8), steps=1, guidance=2.0, guidance_drop=["image"])
    with pytest.raises(ValueError, match="unknown conditioner"):
        model.conditioning(captions, retrieval.training_neighbours(ids[:2]), drop={"image": torch.ones(2).bool()})
    z = model.sample(cond, (4, 8, 8), steps=2, sampler="ddim", guidance=2.0, guidance_drop=["retrieval"],
                     generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()


def test_per_conditioner_dropout_probabilities() -> None:
    model = LatentDiffusion(unet(context_dims={"a": CTX_DIM, "b": CTX_DIM}),
                            {"text": HashFiLM(), "a": Tokens(dropout=0.5), "b": Tokens()}, cfg_dropout=0.2)
    assert model.cfg_dropout == {"text": 0.2, "a": 0.5, "b": 0.2}  # "a" keeps its own
    masks = model.training_drop(20000, torch.Generator().manual_seed(0))
    freq = {name: m.float().mean().item() for name, m in masks.items()}
    assert freq == pytest.approx({"text": 0.2, "a": 0.5, "b": 0.2}, abs=0.015)
    assert not torch.equal(masks["text"], masks["b"])  # independent draws

    by_name = LatentDiffusion(unet(context_dims={"a": CTX_DIM, "b": CTX_DIM}),
                              {"text": HashFiLM(), "a": Tokens(), "b": Tokens()}, cfg_dropout={"a": 0.3})
    assert by_name.cfg_dropout == {"text": 0.0, "a": 0.3, "b": 0.0}
    assert not by_name.training_drop(1000, None)["text"].any()
    with pytest.raises(ValueError, match=r"cfg_dropout names unknown conditioner\(s\) \['c'\]"):
        LatentDiffusion(unet(context_dims={"a": CTX_DIM}), {"text": HashFiLM(), "a": Tokens()}, cfg_dropout={"c": 0.1})
    with pytest.raises(ValueError, match="contradicts the conditioner's own dropout"):
        LatentDiffusion(unet(context_dims={"a": CTX_DIM}), {"text": HashFiLM(), "a": Tokens(dropout=0.5)},
                        cfg_dropout={"a": 0.1})
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        Tokens(dropout=1.5)


# --------------------------------------------------------------------------- construction checks
def test_routes_and_widths_are_checked_against_the_unet() -> None:
    with pytest.raises(ValueError, match=r"film_dim is 16 but the 'text' conditioner \(HashFiLM\) gives 24"):
        LatentDiffusion(unet(), {"text": HashFiLM(dim=24)})
    with pytest.raises(ValueError, match="takes a FiLM vector .* but no conditioner routes to film"):
        LatentDiffusion(unet(context_dims={"a": CTX_DIM}), {"a": Tokens()})
    with pytest.raises(ValueError, match="at most one conditioner can route to film"):
        LatentDiffusion(unet(), {"text": HashFiLM(), "other": HashFiLM()})
    with pytest.raises(ValueError, match=r"'a' conditioner projects to 8 but the UNet's context_dims\['a'\] is 16"):
        LatentDiffusion(unet(context_dims={"a": CTX_DIM}), {"text": HashFiLM(), "a": Tokens(dim=8)})
    with pytest.raises(ValueError, match=r"routes to the context 'b'.*context_dims only for \['a'\]"):
        LatentDiffusion(unet(context_dims={"a": CTX_DIM}), {"text": HashFiLM(), "b": Tokens()})
    with pytest.raises(ValueError, match="routes to the reference 'ref'.*UNetModel has no reference_dims"):
        LatentDiffusion(unet(), {"text": HashFiLM(), "ref": Tokens(route="reference")})
    with pytest.raises(ValueError, match="route must be one of film, context, concat, reference"):
        Tokens(route="sideways")
    with pytest.raises(ValueError, match="clashes with an attribute"):
        LatentDiffusion(unet(), {"text": HashFiLM(), "unet": Tokens()})
    with pytest.raises(TypeError, match="'a' is a Linear, not a tta.generators.conditioning.Conditioner"):
        LatentDiffusion(unet(), {"text": HashFiLM(), "a": nn.Linear(2, 2)})  # type: ignore[dict-item]


def test_missing_input_keys_are_named(tmp_path: Path) -> None:
    features, index = make_store_and_table([f"c{i}" for i in range(6)], tmp_path)
    retrieval = RetrievalConditioner(str(features), str(index), k=2, context_dim=CTX_DIM)
    retrieval.name = "retrieval"
    with pytest.raises(MissingInputError, match=r"'retrieval' \(RetrievalConditioner\) reads input\(s\) "
                                                r"\['neighbours'\].*keys: \['captions'\]"):
        retrieval({"captions": ["a dog"]})
    model = LatentDiffusion(unet(context_dims={"retrieval": CTX_DIM}), {"text": HashFiLM(), "retrieval": retrieval})
    with pytest.raises(MissingInputError, match="neighbours"):
        model.conditioning(["a dog barks"])  # this model retrieves: neighbours are needed
    with pytest.raises(MissingInputError, match="captions"):
        model.conditioning({"neighbours": [["c1", "c2"]]})
    assert isinstance(MissingInputError("x"), KeyError)


def test_retrieval_attribute_is_none_without_it_and_other_names_still_raise() -> None:
    model = LatentDiffusion(unet(), {"text": HashFiLM()})
    assert model.retrieval is None and model.conditioners == {"text": model.text}
    with pytest.raises(AttributeError):
        _ = model.no_such_thing
    assert issubclass(LatentDiffusion, ConditionedModel)


# --------------------------------------------------------------------------- concat route
def test_concat_route_appends_channels_checked_against_in_channels() -> None:
    maps = MapConcat(channels=2)
    model = LatentDiffusion(unet(in_channels=6), {"text": HashFiLM(), "maps": maps})
    assert model.concat_channels == 2
    x = torch.randn(2, 4, 8, 13)
    given = torch.randn(2, 2, 8, 13)
    cond = model.conditioning({"captions": ["a", "bb"], "maps": given})
    seen: list[torch.Tensor] = []
    hook = model.unet.conv_in.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        out = model.denoise(x, torch.tensor([10, 500]), cond)
        model.denoise(x, torch.tensor([10, 500]), model.unconditional(cond, drop=["maps"]))
    finally:
        hook.remove()
    assert out.shape == x.shape  # the UNet's output has the latents' channels
    assert model.factor == 2 and seen[0].shape == (2, 6, 8, 14)  # padded to the UNet factor
    torch.testing.assert_close(seen[0][:, :4, :, :13], x)
    torch.testing.assert_close(seen[0][:, 4:, :, :13], given * 1.5)
    assert not seen[1][:, 4:].any()  # the null of a concat conditioner: zeros
    dropped = model.conditioning({"captions": ["a", "bb"], "maps": given}, drop={"maps": torch.tensor([True, False])})
    assert not dropped.concat["maps"][0].any() and dropped.concat["maps"][1].any()
    both = cond.cat(model.unconditional(cond))
    assert both.concat["maps"].shape == (4, 2, 8, 13) and both.batch_size == 4
    with pytest.raises(ValueError, match=r"concat conditioner 'maps' gives \(2, 2, 8, 8\)"):
        model.denoise(x, torch.tensor([10, 500]), model.conditioning({"captions": ["a", "b"],
                                                                       "maps": torch.zeros(2, 2, 8, 8)}))
    with pytest.raises(ValueError, match=r"in_channels \(4\) must be its out_channels \(4, the latents\) plus "
                                         r"the concat conditioners' channels \{'maps': 2\}"):
        LatentDiffusion(unet(), {"text": HashFiLM(), "maps": MapConcat(2)})


def test_module_takes_extra_conditioners_and_checks_latent_channels(bert: Path) -> None:
    from tests.ldm_fixtures import tiny_vae_config
    from tta.generators.ldm.module import LatentDiffusionModule

    def module(unet_net: nn.Module, **kw: Any) -> LatentDiffusionModule:
        return LatentDiffusionModule(unet=unet_net, vae=build(tiny_vae_config()), scale_factor=1.0,
                                     clap=build(tiny_clap_config(bert)), mel="demo", **kw)

    m = module(unet(in_channels=6), conditioners={"maps": MapConcat(2)}, cfg_dropout={"text": 0.1})
    assert m.model.conditioner_names == ("text", "maps") and m.model.cfg_dropout == {"text": 0.1, "maps": 0.0}
    assert "model.maps.gain" in m.state_dict() and "model.text.null" in m.state_dict()
    with pytest.raises(ValueError, match="give the extra conditioners other names"):
        module(unet(), conditioners={"text": HashFiLM()})
    with pytest.raises(ValueError, match=r"in_channels is 10 but the VAE's latents have 4 channels \(plus 2 concat"):
        module(unet(in_channels=10, out_channels=8), conditioners={"maps": MapConcat(2)})


# --------------------------------------------------------------------------- token-level text context
def test_text_token_context_feeds_cross_attention_and_trains(bert: Path) -> None:
    from tta.encoders.text import BertTextEncoder
    from tta.generators.conditioning.text_tokens import TextTokenContext

    assert registry.get("text_token_context", "conditioner") is TextTokenContext
    encoder = BertTextEncoder(str(bert), max_length=32)
    tokens = TextTokenContext(encoder, dropout=0.0)
    torch.manual_seed(0)
    text = ClapTextFiLM(build(tiny_clap_config(bert)))
    model = LatentDiffusion(unet(context_dims={"tokens": encoder.dim}), {"text": text, "tokens": tokens})
    captions = ["a dog barks", "rain falls on a tin roof"]
    cond = model.conditioning(captions)
    seq, mask = cond.context["tokens"]
    assert seq.shape[:2] == mask.shape and seq.shape == (2, mask.shape[1], encoder.dim)
    assert mask.sum(1)[1] > mask.sum(1)[0]  # the longer caption has more real tokens
    assert not model.unconditional(cond, drop=["tokens"]).context["tokens"][1].any()
    # the encoder stays frozen; the UNet's cross-attention to the tokens learns
    loss = model.loss(torch.randn(2, 4, 8, 8), captions, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    attn = [p for n, p in model.unet.named_parameters() if "tokens" in n and p.grad is not None]
    assert attn and any(p.grad.abs().sum() > 0 for p in attn)
    with pytest.raises(TypeError, match="TextEncoder"):
        TextTokenContext(nn.Linear(2, 2))
    with pytest.raises(MissingInputError, match="captions"):
        tokens({"ids": ["c0"]}, None, torch.device("cpu"))
