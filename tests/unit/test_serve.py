"""`diffquant serve` on a real ASGI server (uvicorn on 127.0.0.1, started torch-free as a user
would), exercised with real HTTP requests: PNGs for good requests, 4xx JSON errors for bad ones,
503 for a full queue under a concurrent burst, and the server stays up."""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diffquant.engines.build import BuildConfig, build
from tests.pipelines import BLOCK_TORCH, export_tiny, start_server

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the [dev] extra)")
pytest.importorskip("fastapi", reason="serve needs the [serve] extra (FastAPI + uvicorn)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    _, _, exp = export_tiny("sd", root, ["a red cat", "a blue dog"])
    eng = build(exp, root / "eng", BuildConfig(backend="onnxruntime"))
    cmd = [
        sys.executable,
        "-c",
        BLOCK_TORCH,
        "serve",
        str(eng),
        "--port",
        "0",
        "--queue",
        "2",
        "--max-batch",
        "2",
        "--steps",
        "2",
        "--threads",
        "1",
    ]
    proc, url = start_server(cmd, Path(__file__).parents[2])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_generate_returns_a_png(server):
    from PIL import Image

    r = httpx.post(
        f"{server}/generate",
        json={"prompt": "a lighthouse", "negative_prompt": "a dog", "seed": 7, "steps": 2},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (32, 32) and img.text["prompt"] == "a lighthouse" and img.text["seed"] == "7"
    again = httpx.post(
        f"{server}/generate",
        json={"prompt": "a lighthouse", "negative_prompt": "a dog", "seed": 7, "steps": 2},
        timeout=120,
    )
    assert again.content == r.content  # same request, same seed: the same image


@pytest.mark.parametrize(
    "body, status, says",
    [
        ({"prompt": ""}, 422, "prompt: empty"),
        ({"prompt": "a" * 3000}, 422, "prompt"),
        ({"prompt": "a cat", "steps": 0}, 422, "steps"),
        ({"prompt": "a cat", "steps": 1000}, 422, "steps"),
        ({"prompt": "a cat", "height": 64, "width": 64}, 422, "outside this engine's profile"),
        ({"prompt": "a cat", "seed": "x"}, 422, "seed"),
        ("{not json", 422, "JSON"),
    ],
)
def test_bad_requests_are_clean_4xx(server, body, status, says):
    if isinstance(body, str):
        r = httpx.post(f"{server}/generate", content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(f"{server}/generate", json=body, timeout=30)
    assert r.status_code == status and says.lower() in r.json()["error"].lower(), r.text


def test_concurrent_burst_gets_pngs_or_503_and_the_server_stays_up(server):
    def one(i: int):
        return httpx.post(f"{server}/generate", json={"prompt": "a red cat", "seed": i, "steps": 2}, timeout=300)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2, codes
    assert all(a.content.startswith(b"\x89PNG") for a in answers if a.status_code == 200)
    assert all("busy" in a.json()["error"] for a in answers if a.status_code == 503)
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok" and health["images"] >= codes.count(200)
