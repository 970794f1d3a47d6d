"""An engine folder as a whole text-to-image pipeline, torch-free: tokenizers and text-encoder
engines make the conditioning of any prompt (with the negative prompt for CFG), the denoiser
engines sample with the pipeline's numpy scheduler, the VAE-decoder engine turns latents into
images. `build_parts` puts the parts into a folder being built; `PipelineFromFolder` loads one."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from diffquant._check import check_value, contained
from diffquant.engines.base import Engine
from diffquant.engines.runtime import Conditioning, GenerateConfig, PromptTable, generate, initial_noise
from diffquant.engines.text import TextConditioner
from diffquant.errors import DiffquantError

__all__ = ["DeployedPipeline", "PipelineFromFolder", "PipelineRequest", "build_parts", "part_graphs", "tokenizer_files"]


def part_graphs(runtime: dict) -> dict[str, dict]:
    """Name -> runtime.json entry of every exported part graph (text encoders, VAE)."""
    parts = {e["component"]: e for e in runtime.get("text", {}).get("encoders", [])}
    parts.update({f"vae_{k}": v for k, v in runtime.get("vae", {}).items()})
    return parts


def tokenizer_files(runtime: dict) -> list[str]:
    return [e["tokenizer_file"] for e in runtime.get("text", {}).get("encoders", [])]


def _part_inputs(entry: dict, runtime: dict) -> list[dict]:
    """The part's inputs as runtime.json-style specs, for a TensorRT profile."""
    if "tokenizer_file" in entry:
        names = ["input_ids", "attention_mask"] if entry.get("feed_mask") else ["input_ids"]
        return [{"name": n, "shape": ["batch", entry["max_length"]]} for n in names]
    if entry["input"] == "latents":
        return [{"name": "latents", "shape": ["batch", *runtime["sample_shape"]]}]
    return [{"name": entry["input"], "shape": ["batch", *entry["shape"]]}]


def build_parts(src: Path, runtime: dict, backend: str, cfg, tmp: Path, sha) -> dict[str, dict]:
    """Build every part graph of the export in ``src`` into ``tmp``: TensorRT engines (dynamic
    batch) for the tensorrt backend, else the ONNX graphs themselves, run by ONNX Runtime (the
    tokenizers travel as side files, hashed like runtime.json)."""
    out = {}
    for name, entry in part_graphs(runtime).items():
        onnx_file = contained(src, entry["file"], f"{src / 'runtime.json'}: {name}.file")
        if not onnx_file.is_file():
            raise DiffquantError(f"{onnx_file} is missing; export the model again")
        rec = {"onnx": entry["file"], "onnx_sha256": sha(onnx_file), "dtype": entry.get("dtype", "float32")}
        if backend == "tensorrt":
            from diffquant.engines.tensorrt import build_trt_engine

            rec["file"] = Path(entry["file"]).with_suffix(".engine").name
            profile = replace(cfg.tensorrt, dynamic=True, max_batch=max(cfg.tensorrt.max_batch, cfg.tensorrt.batch))
            rec.update(build_trt_engine(onnx_file, tmp / rec["file"], _part_inputs(entry, runtime), profile))
            rec["runner"] = "tensorrt"
        elif rec["dtype"] == "float16":  # ONNX Runtime's CPU kernels lack FP16 for several ops
            import onnx

            from diffquant.exporters.fp16 import upcast_float16

            rec["file"], rec["dtype"], rec["upcast_from"], rec["runner"] = (
                entry["file"],
                "float32",
                "float16",
                "onnxruntime",
            )
            onnx.save(upcast_float16(onnx.load(str(onnx_file))), str(tmp / rec["file"]))
        else:
            rec["file"] = entry["file"]
            shutil.copy2(onnx_file, tmp / entry["file"])
            rec["runner"] = "onnxruntime"
        rec["file_sha256"] = sha(tmp / rec["file"])
        out[name] = rec
    return out


def _load_part(folder: Path, rec: dict, threads: int, sha) -> Engine:
    path = contained(folder, rec.get("file"), f"{folder / 'engine.json'}: parts")
    if not path.is_file():
        raise DiffquantError(f"engine file {path} is missing; build the folder again with `diffquant build`")
    if sha(path) != rec.get("file_sha256"):
        raise DiffquantError(f"{path} changed since it was built (hash mismatch); build the folder again")
    if rec.get("runner") == "tensorrt":
        from diffquant.engines.tensorrt import TrtEngine

        return TrtEngine(path, rec)
    from diffquant.engines.ort import OrtEngine

    return OrtEngine(path, threads=threads)


@dataclass
class PipelineRequest:
    """One generation: prompts (one per image, or one for all), an optional negative prompt
    (likewise), the sampler settings, the image size (must be the engine's own), and optionally
    one seed per image (image i then starts from the noise of ``(seeds[i], 0)``, as a request of
    one image with that seed would: how `serve` batches requests)."""

    prompts: list[str]
    n: int = 1
    negative: list[str] | None = None
    settings: GenerateConfig = None  # type: ignore[assignment]
    height: int | None = None
    width: int | None = None
    seeds: list[int] | None = None


class DeployedPipeline:
    """The engines of a folder as a pipeline (a context manager): `conditioning` for prompts,
    `__call__` for images in [-1, 1] (latent models decoded by the VAE engine)."""

    def __init__(
        self, folder: Path, denoiser: Engine, runtime: dict, parts: dict[str, Engine], meta: dict | None = None
    ) -> None:
        self.folder, self.denoiser, self.runtime, self.parts, self.meta = folder, denoiser, runtime, parts, meta or {}
        text = runtime.get("text")
        self.text = TextConditioner(folder, text, parts) if text else None
        self.table = PromptTable.from_runtime(folder, runtime)
        self.resolution = tuple(runtime.get("resolution") or ())
        self.last_timings: dict[str, float] = {}

    @property
    def decodes(self) -> bool:
        return "vae_decoder" in self.parts

    def check_size(self, height: int | None, width: int | None) -> None:
        """Refuse a size other than the engine's profile (the graphs have a static image size)."""
        if (
            (height or width)
            and self.resolution
            and (height or self.resolution[0], width or self.resolution[1]) != self.resolution
        ):
            h, w = self.resolution
            raise DiffquantError(
                f"{height or h}x{width or w} is outside this engine's profile: it was exported for {h}x{w} images; "
                f"export the model again with --resolution {h if not height else height},{w if not width else width}"
            )

    def conditioning(self, req: PipelineRequest) -> Conditioning:
        """Conditional and unconditional rows for the request: encoded by the text engines where
        the folder has them (non-text inputs such as SDXL's time ids from the prompt table),
        else looked up in the prompt table."""
        if self.text is None:
            ids = (
                [self.table.prompt_id(req.prompts[i % len(req.prompts)]) for i in range(req.n)]
                if self.table.null_id > 1
                else [0] * req.n
            )
            return Conditioning.from_table(self.table, ids)
        unique = list(dict.fromkeys(req.prompts))
        rows = self.text(unique)
        pick = np.array([unique.index(req.prompts[i % len(req.prompts)]) for i in range(req.n)])
        base = Conditioning.from_table(self.table, [0] * req.n)  # inputs that are not text (time ids, sizes)
        cond = {**base.cond, **{k: v[pick] for k, v in rows.items()}}
        uncond = {**base.uncond, **self.text.negative(req.negative, req.n)}
        return Conditioning(cond, uncond, base.static)

    def latents(self, req: PipelineRequest, progress: bool = False, cond: Conditioning | None = None) -> np.ndarray:
        """The final latents of a request (``cond``: its conditioning, when made already)."""
        self.check_size(req.height, req.width)
        shape = tuple(self.runtime["sample_shape"])
        noise = np.concatenate([initial_noise(s, 1, shape) for s in req.seeds]) if req.seeds else None
        return generate(
            self.denoiser,
            self.runtime,
            cond or self.conditioning(req),
            req.n,
            req.settings or GenerateConfig(),
            progress,
            noise,
        )

    def decode(self, latents: np.ndarray, batch: int = 4) -> np.ndarray:
        """Final latents -> images in [-1, 1] with the VAE-decoder engine (pixel models: as is)."""
        if not self.runtime.get("latent"):
            return np.clip(latents, -1, 1)
        if not self.decodes:
            raise DiffquantError(
                f"{self.folder} holds no VAE decoder (exported by an older diffquant, or without pipeline parts); export and build it again"
            )
        eng, spec = self.parts["vae_decoder"], self.runtime["vae"]["decoder"]
        per = min(batch, getattr(eng, "max_batch", 0) or batch)
        outs = [
            eng.run({spec["input"]: latents[i : i + per].astype(eng.input_dtype(spec["input"]))}, [spec["output"]])[
                spec["output"]
            ]
            for i in range(0, len(latents), per)
        ]
        return np.clip(np.concatenate(outs).astype(np.float32), -1, 1)

    def __call__(self, req: PipelineRequest, progress: bool = False) -> np.ndarray:
        """Images of a request; ``last_timings`` then holds the seconds of each stage."""
        self.check_size(req.height, req.width)
        t0 = time.perf_counter()
        cond = self.conditioning(req)
        t1 = time.perf_counter()
        lat = self.latents(req, progress, cond)
        t2 = time.perf_counter()
        images = self.decode(lat)
        t3 = time.perf_counter()
        self.last_timings = {
            "text_s": t1 - t0,
            "denoise_s": t2 - t1,
            "decode_s": t3 - t2,
            "total_s": t3 - t0,
            "images": req.n,
        }
        return images

    def close(self) -> None:
        for e in [self.denoiser, *self.parts.values()]:
            e.close()

    def __enter__(self) -> DeployedPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def PipelineFromFolder(folder: str | Path, threads: int = 0) -> DeployedPipeline:  # noqa: N802
    """Loader: the whole pipeline of a built engine folder (every file hash-checked)."""
    from diffquant.engines.bundle import EnginesFromFolder, _engine_meta, file_sha256

    folder = Path(folder)
    with ExitStack() as opened:  # a part that fails to load closes the engines loaded before it
        denoiser, runtime = EnginesFromFolder(folder, threads)
        opened.callback(denoiser.close)
        meta = _engine_meta(folder)
        parts: dict[str, Engine] = {}
        for name, rec in check_value(
            meta.get("parts", {}), dict[str, dict], f"{folder / 'engine.json'}: parts", "build the folder again"
        ).items():
            parts[name] = _load_part(folder, rec, threads, file_sha256)
            opened.callback(parts[name].close)
        pipe = DeployedPipeline(folder, denoiser, runtime, parts, meta)
        opened.pop_all()
    return pipe
