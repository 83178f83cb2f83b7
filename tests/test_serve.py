"""`tta serve`: the web API on tiny DreamAudio and AudioLDM pipeline folders (FastAPI's TestClient),
the lock and progress of `GenerationService`, and the page in a real headless Chromium (Selenium;
skipped with a message where no browser and driver are installed)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from tests.conftest import REPO
from tta.serve.app import create_app
from tta.serve.service import GenerationRequest, GenerationService

pytestmark = pytest.mark.usefixtures("single_thread")

SR = 22050  # the demo mel preset of the tiny pipelines
FAST = {"duration": "0.5", "steps": "3", "seed": "1"}


def _export(config: dict[str, Any], root: Path, name: str) -> Path:
    from tests.ldm_fixtures import build_module, write_checkpoint
    from tta.pipelines.base import export_pipeline

    torch.manual_seed(0)
    module = build_module(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random offsets: the zero-initialised paths (references, cross-attention) contribute
        for p in module.model.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = write_checkpoint(module, config, root / f"{name}.ckpt")
    return export_pipeline(ckpt, root / name, vocoder="griffinlim", use_ema=False)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DreamAudio pipeline folder (3 references of 1 s, rectified flow: Euler, 25 steps)."""
    from tests.hf_fixtures import WIDTH, make_t5_folder
    from tests.ldm_fixtures import tiny_dreamaudio_config

    root = tmp_path_factory.mktemp("serve_dream")
    return _export(tiny_dreamaudio_config(make_t5_folder(root / "t5"), WIDTH), root, "dream")


@pytest.fixture(scope="module")
def dream(dream_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> GenerationService:
    from tta.pipelines.base import load_pipeline

    return GenerationService(load_pipeline(dream_dir), tmp_path_factory.mktemp("serve_out"), source=str(dream_dir),
                             max_steps=50)


@pytest.fixture(scope="module")
def client(dream: GenerationService) -> TestClient:
    return TestClient(create_app(dream))


def _wav_bytes(seconds: float = 0.5, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, round(seconds * SR)).astype(np.float32)
    sf.write(buf, noise, SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _post(client: TestClient, refs: list[tuple[str, bytes]] = (), captions: list[str] = (),
          **fields: Any) -> Any:
    data = {**FAST, "job": uuid.uuid4().hex, **fields}
    data["ref_caption"] = list(captions)
    files = [("ref_audio", (name, content, "application/octet-stream")) for name, content in refs]
    return client.post("api/generate", data=data, files=files or None)


def test_generate_returns_a_wav_and_a_spectrogram(client: TestClient, dream: GenerationService) -> None:
    resp = _post(client, prompt="a dog barks", job="first")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "first" and body["sample_rate"] == SR
    assert body["settings"]["steps"] == 3 and body["settings"]["seed"] == 1 and body["settings"]["guidance"] == 2.0
    audio = client.get(body["audio"])
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
    wav, sr = sf.read(io.BytesIO(audio.content))
    assert sr == SR and wav.shape == (round(0.5 * SR),) and np.abs(wav).max() > 0
    png = client.get(body["spectrogram"])
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG\r\n\x1a\n")
    # progress: one Euler step per denoiser evaluation, all counted
    assert client.get("api/progress/first").json() | {"elapsed": 0} == {
        "state": "done", "step": 3, "total": 3, "elapsed": 0}
    row = json.loads((dream.out / "generations.jsonl").read_text().splitlines()[0])
    assert row["id"] == "first" and row["captions"] == ["a dog barks"] and row["audio"] == "first.wav"
    again = client.get(_post(client, prompt="a dog barks").json()["audio"])
    assert again.content == audio.content  # the same seed gives the same clip

    refs = _post(client, refs=[("bell.wav", _wav_bytes())], captions=["a bell rings"], prompt="a dog and a bell")
    assert refs.status_code == 200, refs.text
    assert refs.json()["settings"]["references"] == [["a bell rings"]]
    assert client.get(refs.json()["audio"]).content != audio.content


@pytest.mark.parametrize(("fields", "refs", "captions", "expected"), [
    ({"prompt": ""}, [], [], r"prompts must be non-empty"),
    ({"prompt": "   "}, [], [], r"prompts must be non-empty"),
    ({"prompt": "a dog", "duration": "1e6"}, [], [], r"duration must be <= 327.68 \(the pipeline's max_duration\)"),
    ({"prompt": "a dog", "duration": "-1"}, [], [], r"duration must be > 0"),
    ({"prompt": "a dog", "duration": "nan"}, [], [], r"duration must be a finite number"),
    ({"prompt": "a dog", "guidance": "nan"}, [], [], r"guidance must be a finite number, got nan"),
    ({"prompt": "a dog", "guidance": "0.5"}, [], [], r"guidance must be >= 1"),
    ({"prompt": "a dog", "steps": "0"}, [], [], r"steps must be an integer >= 1, got 0"),
    ({"prompt": "a dog", "steps": "2.5"}, [], [], r"^steps: .*integer"),
    ({"prompt": "a dog", "steps": "5000"}, [], [], r"steps must be <= 50 \(the server's --max-steps\)"),
    ({"prompt": "a dog", "seed": "-1"}, [], [], r"^seed: .*greater than or equal to 0"),
    ({"prompt": "a dog", "job": "../etc"}, [], [], r"^job must be 1-64 letters"),
    ({"prompt": "a dog"}, [("notes.txt", b"not audio at all")], ["a dog"], r"^cannot load audio notes.txt: unreadable \(Error opening 'notes.txt'"),
    ({"prompt": "a dog"}, [("dog.wav", _wav_bytes())], [" "], r"references\[0\] of prompt 0: the caption must be"),
    ({"prompt": "a dog"}, [("dog.wav", _wav_bytes())], [], r"^ref_caption: 0 captions given for 1 reference files"),
    ({"prompt": "a dog"}, [(f"{i}.wav", _wav_bytes()) for i in range(4)], ["x"] * 4,
     r"4 references given; this model was trained with 3"),
])
def test_bad_input_is_refused_by_name(client: TestClient, fields: dict[str, str], refs: list[tuple[str, bytes]],
                                      captions: list[str], expected: str) -> None:
    job = fields.pop("job", uuid.uuid4().hex)
    resp = _post(client, refs=refs, captions=captions, job=job, **fields)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and re.search(expected, detail), detail
    assert "tta-serve-" not in detail  # the upload folder is not shown
    progress = client.get(f"api/progress/{job}")
    if expected.startswith(("^steps:", "^seed:", "^job", "^ref_caption")):  # refused before the service saw it
        assert progress.status_code == 404
    else:
        assert progress.json()["state"] == "failed"


def test_page_info_results_and_job_ids(client: TestClient, dream: GenerationService) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text and "api/generate" in page.text
    info = client.get("api/info").json()
    assert info["references"] is True and info["num_references"] == 3 and info["reference_seconds"] == 1.0
    assert info["defaults"] == {"steps": 25, "guidance": 2.0, "sampler": "euler", "seed": 0, "duration": 10.24}
    assert info["counts_steps"] is True and info["max_steps"] == 50
    assert client.get("api/progress/nobody").status_code == 404
    for name in ("nope.wav", "..%2Fgenerations.jsonl", "first.txt"):
        assert client.get(f"api/results/{name}").status_code == 404
    assert _post(client, prompt="a cat", job="twice").status_code == 200
    again = _post(client, prompt="a cat", job="twice")
    assert again.status_code == 422 and "already submitted" in again.json()["detail"]


def test_plain_ldm_pipeline_takes_no_references(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.hf_fixtures import make_bert_folder
    from tests.ldm_fixtures import tiny_clap_config, tiny_unet_config, tiny_vae_config
    from tta.pipelines.base import load_pipeline

    root = tmp_path_factory.mktemp("serve_ldm")
    config = {"class_path": "latent_diffusion",
              "init_args": {"unet": tiny_unet_config(), "vae": tiny_vae_config(), "scale_factor": 1.0, "mel": "demo",
                            "clap": tiny_clap_config(make_bert_folder(root / "bert"))}}
    folder = _export(config, root, "ldm")
    client = TestClient(create_app(GenerationService(load_pipeline(folder), root / "out")))
    info = client.get("api/info").json()
    assert info["references"] is False and info["kind"] == "latent_diffusion" and info["defaults"]["sampler"] == "ddim"
    resp = _post(client, refs=[("dog.wav", _wav_bytes())], captions=["a dog"], prompt="a dog", steps="2")
    assert resp.status_code == 422 and "takes no reference clips" in resp.json()["detail"]
    ok = _post(client, prompt="a dog", steps="2", job="ldm")
    assert ok.status_code == 200 and ok.json()["settings"]["sampler"] == "ddim"
    progress = client.get("api/progress/ldm").json()
    assert (progress["state"], progress["step"], progress["total"]) == ("done", 2, 2)


def test_requests_are_serialized_and_report_queued(dream: GenerationService) -> None:
    results: dict[str, Any] = {}
    request = GenerationRequest(prompt="a bell", duration=0.3, steps=2)
    with dream._generate_lock:  # another generation holds the pipeline
        worker = threading.Thread(target=lambda: results.update(out=dream.generate(request, "queued-job")))
        worker.start()
        deadline = time.monotonic() + 10
        while dream.progress("queued-job") is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert dream.progress("queued-job")["state"] == "queued" and "out" not in results
    worker.join(timeout=30)
    assert results["out"]["id"] == "queued-job" and dream.progress("queued-job")["state"] == "done"


def test_cli_refuses_bad_options_and_a_missing_extra(dream_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tta.serve
    from tta.cli import main

    assert main(["serve", "--pipeline", str(dream_dir), "--port", "0"]) == 2
    assert "tta serve: error: --port must be an integer >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setitem(tta.serve.SERVE_MODULES, "no_such_module_xyz", "no-such-package")
    assert main(["serve", "--pipeline", str(dream_dir)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'tta[serve]' (missing no-such-package)" in err


def test_nothing_else_in_tta_imports_the_server() -> None:
    importers = [p.relative_to(REPO) for p in (REPO / "tta").rglob("*.py")
                 if "serve" not in p.parent.name and re.search(r"^\s*(from|import) tta\.serve", p.read_text(), re.MULTILINE)]
    assert importers == [Path("tta/cli.py")]


# ----------------------------------------------------------------------------- the page in a browser
def _browser() -> tuple[str, str]:
    """Chromium and chromedriver: $TTA_CHROMIUM / $TTA_CHROMEDRIVER, else the first on PATH."""
    browser = os.environ.get("TTA_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("TTA_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no headless browser: install Chromium and its driver (Debian: apt-get install -y chromium "
                    "chromium-driver) or set TTA_CHROMIUM and TTA_CHROMEDRIVER")
    return browser, driver


@pytest.fixture
def server(dream: GenerationService) -> Iterator[str]:
    """The app served by uvicorn on a free local port (in a thread); its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(dream), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.slow
def test_page_in_headless_chromium(server: str, dream: GenerationService) -> None:
    browser, driver_path = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, 20)
        driver.get(server)
        wait.until(lambda d: d.find_element(By.ID, "steps").get_attribute("value") == "25")
        assert driver.find_element(By.ID, "references").is_displayed()  # a DreamAudio pipeline
        for field, value in (("duration", "0.5"), ("steps", "4")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)

        driver.find_element(By.ID, "generate").click()  # empty prompt: the pipeline's message on the page
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "prompts must be non-empty" in driver.find_element(By.ID, "error").text

        driver.find_element(By.ID, "prompt").send_keys("a dog barks in the rain")
        gate = threading.Event()  # hold the sampler after its 2nd step: the page shows the step count

        def hold(*_: Any) -> None:
            if dream._current is not None and dream._current.step >= 2:
                gate.wait(20)

        handle = dream.denoiser.register_forward_hook(hold)
        try:
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "progress-text").text == "denoising step 2 / 4")
            assert driver.find_element(By.ID, "status").is_displayed()
            assert driver.find_element(By.ID, "progress").get_attribute("value") == "2"
        finally:
            gate.set()
            handle.remove()
        wait.until(lambda d: d.find_element(By.ID, "result").is_displayed())
        assert not driver.find_element(By.ID, "status").is_displayed()
        assert not driver.find_element(By.ID, "error").is_displayed()
        # the browser itself decoded both: the audio's duration and the image's pixels
        wait.until(lambda d: d.execute_script(
            "const a = document.getElementById('audio'); return a.readyState >= 1 && a.duration > 0"))
        duration = driver.execute_script("return document.getElementById('audio').duration")
        assert duration == pytest.approx(0.5, abs=0.01)
        wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('spectrogram'); return i.complete && i.naturalWidth > 0"))
        src = driver.find_element(By.ID, "audio").get_attribute("src")
        assert src.startswith(server + "api/results/") and src.endswith(".wav")
    finally:
        driver.quit()
    import urllib.request

    with urllib.request.urlopen(src, timeout=10) as resp:
        wav, sr = sf.read(io.BytesIO(resp.read()))
    assert sr == SR and wav.shape == (round(0.5 * SR),)
