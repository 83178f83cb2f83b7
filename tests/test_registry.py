"""Registry: names, errors, config resolution, entry-point plugins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tta import registry


def test_builtin_components_are_registered() -> None:
    comps = registry.components()
    assert {"vae", "hifigan"} <= set(comps["module"])
    assert "audio" in comps["datamodule"]
    assert {"mel_vae"} <= set(comps["autoencoder"])
    assert {"hifigan_generator", "griffinlim"} <= set(comps["vocoder"])
    assert registry.resolve("vae") == "tta.generators.vae.module.VAEModule"


def test_unknown_name_lists_registered_names() -> None:
    with pytest.raises(registry.UnknownComponentError) as err:
        registry.get("no_such_thing")
    msg = str(err.value)
    assert "no_such_thing" in msg and "vae" in msg and "hifigan" in msg
    with pytest.raises(registry.UnknownComponentError, match="unknown module component 'mel_vae'"):
        registry.get("mel_vae", kind="module")


def test_names_are_unique_across_kinds() -> None:
    with pytest.raises(ValueError, match="already registered as a module"):
        @registry.register("network", "vae")
        class Clash:
            pass
    with pytest.raises(ValueError, match="unknown component kind"):
        registry.register("gadget", "x")


def test_resolve_config_rewrites_nested_class_paths() -> None:
    cfg = {"model": {"class_path": "vae", "init_args": {"autoencoder": {"class_path": "mel_vae"}}},
           "trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]}}
    out = registry.resolve_config(cfg)
    assert out["model"]["class_path"] == "tta.generators.vae.module.VAEModule"
    assert out["model"]["init_args"]["autoencoder"]["class_path"] == "tta.generators.vae.network.AutoencoderKL"
    assert out["trainer"]["callbacks"][0]["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"


def _install_plugin(root: Path, module_body: str, name: str) -> None:
    (root / f"{name}.py").write_text(module_body)
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[tta.plugins]\n{name} = {name}\n")


def test_entry_point_plugin_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = (
        "from torch import nn\nfrom tta.registry import register\n\n"
        "@register('network', 'plugin_net')\nclass PluginNet(nn.Module):\n    pass\n"
    )
    _install_plugin(tmp_path, body, "tta_test_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._loaded, "plugins", False)
    try:
        registry.load_plugins()
        assert registry.resolve("plugin_net") == "tta_test_plugin.PluginNet"
    finally:
        registry._REGISTRY["network"].pop("plugin_net", None)
        sys.modules.pop("tta_test_plugin", None)


def test_broken_plugin_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, "raise RuntimeError('boom')\n", "tta_broken_plugin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._loaded, "plugins", False)
    with pytest.raises(ImportError, match="tta_broken_plugin.*boom"):
        registry.load_plugins()
