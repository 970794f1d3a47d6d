"""The deployed pipeline on this CPU, per image: text encoding, denoising (per step), VAE
decoding and the total, from engine folders built with ONNX Runtime, FP32 denoiser against the
quantized one (W8A8, minmax), for the trained builtin digits-ldm and one tiny pipeline per
architecture (SD-1.x, SDXL, PixArt, SD3, Flux; random weights, built from configs by
tests/pipelines.py); and `diffquant serve` under a fixed concurrent load (throughput, p50 / p95
latency per request, 503s).

    python benchmarks/pipeline_cpu.py                      # every family, 20 steps, 4 clients x 5 requests
    python benchmarks/pipeline_cpu.py --families sd --steps 10 --repeats 2

Medians over --repeats runs after one warm-up run. Writes benchmarks/results/pipeline_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffquant._io import write_json, write_text  # noqa: E402
from diffquant.engines.build import BuildConfig, build  # noqa: E402
from diffquant.engines.cpu import cpu_info  # noqa: E402
from diffquant.engines.deployed import PipelineFromFolder, PipelineRequest  # noqa: E402
from diffquant.engines.runtime import GenerateConfig  # noqa: E402
from tests.pipelines import export_minmax, export_tiny, start_server  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("digits-ldm", "sd", "sdxl", "pixart", "sd3", "flux")
RESOLUTION = {"flux": (32, 32)}
PROMPTS = ["a red cat", "a blue dog"]
PROMPT = {"digits-ldm": "a handwritten seven"}  # the prompt timed (others: "a red cat")


def export_family(fam: str, root: Path) -> Path:
    """The export folder of ``fam``: digits-ldm quantized from its trained weights (calibrated on
    8 samples of 10 steps), the others tiny random-weight pipelines."""
    if fam == "digits-ldm":
        from diffquant.models.loading import load_denoiser

        return export_minmax(load_denoiser("builtin:digits-ldm"), root, fam, samples=8, steps=10, timesteps=5)
    return export_tiny(fam, root, PROMPTS, RESOLUTION.get(fam))[2]


def time_pipeline(folder: Path, steps: int, repeats: int, prompt: str = "a red cat") -> dict:
    """Median stage seconds of one image (warm-up run first)."""
    with PipelineFromFolder(folder) as dp:
        req = PipelineRequest([prompt], 1, None, GenerateConfig(steps=steps, seed=0, batch=1))
        dp(req)
        runs = []
        for i in range(repeats):
            req.settings = GenerateConfig(steps=steps, seed=i + 1, batch=1)
            dp(req)
            runs.append(dict(dp.last_timings))
    med = {k: statistics.median(r[k] for r in runs) for k in ("text_s", "denoise_s", "decode_s", "total_s")}
    return {**med, "step_ms": 1000 * med["denoise_s"] / steps}


def serve_load(folder: Path, clients: int, per_client: int, steps: int, prompt: str = "a red cat") -> dict:
    """Start `diffquant serve` on 127.0.0.1 and send ``clients`` x ``per_client`` requests."""
    import httpx

    proc, url = start_server(
        [
            sys.executable,
            "-m",
            "diffquant.cli",
            "serve",
            str(folder),
            "--port",
            "0",
            "--queue",
            str(2 * clients),
            "--max-batch",
            "4",
            "--steps",
            str(steps),
        ],
        ROOT,
    )
    try:

        def client(c: int) -> list[tuple[int, float]]:
            out = []
            for k in range(per_client):
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/generate", json={"prompt": prompt, "seed": c * 1000 + k}, timeout=600)
                out.append((r.status_code, time.perf_counter() - t0))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for part in pool.map(client, range(clients)) for a in part]
        wall = time.perf_counter() - t0
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat = sorted(t for code, t in answers if code == 200)
    ok = len(lat)
    return {
        "clients": clients,
        "requests": len(answers),
        "ok": ok,
        "busy_503": sum(code == 503 for code, _ in answers),
        "images_per_s": ok / wall,
        "p50_s": lat[len(lat) // 2] if lat else None,
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        "batches": health["batches"],
        "wall_s": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=5)
    ap.add_argument("--serve-family", default="digits-ldm", help="the family served under load")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    rows, serve = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for fam in a.families.split(","):
            exp = export_family(fam, root)
            for label in ("fp", "qdq"):
                eng = build(exp, root / f"eng-{fam}-{label}", BuildConfig(backend="onnxruntime", denoiser=label))
                rows.append(
                    {
                        "family": fam,
                        "denoiser": "FP32" if label == "fp" else "W8A8",
                        **time_pipeline(eng, a.steps, a.repeats, PROMPT.get(fam, "a red cat")),
                    }
                )
                print(rows[-1], flush=True)
                if fam == a.serve_family and label == "qdq":
                    serve = {
                        "family": fam,
                        "denoiser": "W8A8",
                        **serve_load(eng, a.clients, a.per_client, a.steps, PROMPT.get(fam, "a red cat")),
                    }
                    print(serve, flush=True)
    out = Path(a.out)
    meta = {"cpu": cpu_info().model, "steps": a.steps, "repeats": a.repeats}
    write_json(out / "pipeline_cpu.json", {**meta, "rows": rows, "serve": serve})
    lines = [
        "# The deployed pipeline on CPU",
        "",
        f"Written by `python benchmarks/pipeline_cpu.py`. CPU: {meta['cpu']}; {a.steps} steps, one image, "
        f"median of {a.repeats} runs; ONNX Runtime engine folders; digits-ldm is the trained builtin (32x32 images, "
        "4x8x8 latents), the others tiny random-weight pipelines (their numbers show the pipeline's overheads more "
        "than a real "
        "model's compute).",
        "",
        "| family | denoiser | text encoding ms | denoising ms / step | decoding ms | total ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['family']} | {r['denoiser']} | {1000 * r['text_s']:.1f} | {r['step_ms']:.1f} | "
        f"{1000 * r['decode_s']:.1f} | {1000 * r['total_s']:.0f} |"
        for r in rows
    ]
    if serve:
        lines += [
            "",
            f"`diffquant serve` ({serve['family']}, {serve['denoiser']}, {a.steps} steps): {serve['clients']} "
            "concurrent clients x "
            f"{a.per_client} requests, queue {2 * serve['clients']}, batches of up to 4",
            "",
            "| requests | PNGs | 503 | images / s | p50 s | p95 s | engine runs |",
            "|---|---|---|---|---|---|---|",
            f"| {serve['requests']} | {serve['ok']} | {serve['busy_503']} | {serve['images_per_s']:.2f} | "
            f"{serve['p50_s']:.2f} | {serve['p95_s']:.2f} | {serve['batches']} |",
        ]
    write_text(out / "pipeline_cpu.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
