"""An engine folder as a whole text-to-image pipeline, torch-free: tokenizers and text-encoder
engines make the conditioning of any prompt (with the negative prompt for CFG), the denoiser
engines sample with the pipeline's numpy scheduler, the VAE-decoder engine turns latents into
images. `PipelineFromFolder` loads one (`engines.folder` checks every file first)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffquant.artifacts import EngineManifest, RuntimeSpec
from diffquant.engines.base import Engine
from diffquant.engines.folder import load_parts, open_denoiser, read_folder
from diffquant.engines.runtime import Conditioning, GenerateConfig, PromptTable, generate, initial_noise
from diffquant.engines.text import TextConditioner
from diffquant.errors import DiffquantError

__all__ = ["DeployedPipeline", "PipelineFromFolder", "PipelineRequest"]


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
        self, folder: Path, denoiser: Engine, runtime: RuntimeSpec, parts: dict[str, Engine], meta: EngineManifest
    ) -> None:
        self.folder, self.denoiser, self.runtime, self.parts, self.meta = folder, denoiser, runtime, parts, meta
        self.text = TextConditioner(folder, runtime.text, parts) if runtime.text else None
        self.table = PromptTable.from_runtime(folder, runtime)
        self.resolution = tuple(runtime.resolution)
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

    def latents(self, req: PipelineRequest, *, progress: bool = False, cond: Conditioning | None = None) -> np.ndarray:
        """The final latents of a request (``cond``: its conditioning, when made already)."""
        self.check_size(req.height, req.width)
        shape = tuple(self.runtime.sample_shape)
        noise = np.concatenate([initial_noise(s, 1, shape) for s in req.seeds]) if req.seeds else None
        settings = req.settings or GenerateConfig()
        cond = cond or self.conditioning(req)
        return generate(self.denoiser, self.runtime, cond, req.n, settings, progress=progress, noise=noise)

    def decode(self, latents: np.ndarray, batch: int = 4) -> np.ndarray:
        """Final latents -> images in [-1, 1] with the VAE-decoder engine (pixel models: as is)."""
        if not self.runtime.latent:
            return np.clip(latents, -1, 1)
        if not self.decodes:
            raise DiffquantError(
                f"{self.folder} holds no VAE decoder (exported by an older diffquant, or without pipeline parts); "
                "export and build it again"
            )
        eng, spec = self.parts["vae_decoder"], (self.runtime.vae or {})["decoder"]
        per = min(batch, getattr(eng, "max_batch", 0) or batch)
        outs = [
            eng.run({spec.input: latents[i : i + per].astype(eng.input_dtype(spec.input))}, [spec.output])[spec.output]
            for i in range(0, len(latents), per)
        ]
        return np.clip(np.concatenate(outs).astype(np.float32), -1, 1)

    def __call__(self, req: PipelineRequest, *, progress: bool = False) -> np.ndarray:
        """Images of a request; ``last_timings`` then holds the seconds of each stage."""
        self.check_size(req.height, req.width)
        t0 = time.perf_counter()
        cond = self.conditioning(req)
        t1 = time.perf_counter()
        lat = self.latents(req, progress=progress, cond=cond)
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
    folder = Path(folder)
    manifest, runtime = read_folder(folder)
    with ExitStack() as opened:  # a part that fails to load closes the engines loaded before it
        denoiser = open_denoiser(folder, manifest, threads)
        opened.callback(denoiser.close)
        parts = load_parts(folder, manifest, threads)
        for part in parts.values():
            opened.callback(part.close)
        pipe = DeployedPipeline(folder, denoiser, runtime, parts, manifest)
        opened.pop_all()
    return pipe
