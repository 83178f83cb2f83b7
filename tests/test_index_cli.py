"""`tta index build` / `tta index search` end to end on a CLAP checkpoint written by `tta fit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tta.cli import main
from tta.retrieval.index import EmbeddingIndex, IndexMismatchError
from tta.retrieval.neighbours import load_neighbour_table


@pytest.fixture(scope="module")
def clap_ckpt(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clap_fit")
    args = ["fit", "--config", str(CONFIGS / "demo" / "clap.yaml"), f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            '--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
            '"init_args": {"every_n_train_steps": 2, "dirpath": "' + str(root / "ck") + '"}}]',
            f"--data.init_args.manifest={tiny_synth}", "--data.init_args.batch_size=4",
            "--data.init_args.segment_seconds=0.5", "--model.init_args.clap.init_args.audio_encoder.init_args.window_seconds=0.5"]
    assert main(args) == 0
    return next((root / "ck").glob("*.ckpt"))


def test_index_build_and_search(clap_ckpt: Path, tiny_synth: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "index"
    assert main(["index", "build", "--manifest", str(tiny_synth), "--clap", str(clap_ckpt), "--out", str(out),
                 "--type", "flat", "--shards", "2", "--neighbours", "5"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 40 and meta["shards"] == 2 and meta["dim"] == 128
    table = load_neighbour_table(out)
    assert len(table) == 40 and all(q not in [n for n, _ in row] and len(row) == 5 for q, row in table.items())
    assert meta["search_device"] == "cpu" and set(meta["embedding_content"]) == {"audio", "text"}
    capsys.readouterr()
    assert main(["index", "search", str(out), "a dog barks", "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("synth_") == 3
    # several queries, one CLAP load, full ids as JSON
    from unittest import mock

    import tta.encoders.clap_towers as towers

    with mock.patch.object(towers, "load_clap_network", wraps=towers.load_clap_network) as loader:
        assert main(["index", "search", str(out), "a dog barks", "rain on a roof", "-k", "2", "--json"]) == 0
    assert loader.call_count == 1
    found = json.loads(capsys.readouterr().out)
    ids = set(json.loads((out / "ids.json").read_text()))
    assert [r["query"] for r in found] == ["a dog barks", "rain on a roof"]
    assert all(len(r["results"]) == 2 and {h["id"] for h in r["results"]} <= ids for r in found)
    assert [h["rank"] for h in found[0]["results"]] == [1, 2]
    with pytest.raises(IndexMismatchError, match="embedding model"):
        EmbeddingIndex.load(out, expect_model_hash="0" * 64)
    lean = tmp_path / "lean"
    assert main(["index", "build", "--manifest", str(tiny_synth), "--clap", str(clap_ckpt), "--out", str(lean),
                 "--type", "ivfsq", "--nbits", "6", "--nlist", "2", "--nprobe", "2", "--neighbours", "3"]) == 0
    spec = json.loads((lean / "meta.json").read_text())["spec"]
    assert (spec["type"], spec["nbits"], spec["nlist"], spec["nprobe"]) == ("ivfsq", 6, 2, 2)
