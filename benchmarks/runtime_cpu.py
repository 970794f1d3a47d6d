"""CPU runtime per denoiser step, side by side: our Q/DQ graphs (W8A8, W4A8; S8 and U8 weights;
both targets) against the floating-point graphs and the peers' own quantizers (ONNX Runtime's
quantize_static, QDQ and QOperator; OpenVINO's NNCF), each on ONNX Runtime and on OpenVINO.
One process, graphs interleaved round by round, medians; every ratio is against ONNX Runtime
FP32 of the same model and batch. Also: file sizes, cosine against fake-quant (ours) and FP32
(all) on recorded inputs, and ONNX Runtime's op-type profile shares.

    python benchmarks/runtime_cpu.py                          # sd-unet and dit-b2 (realistic size)
    python benchmarks/runtime_cpu.py --models digits-sd,digits-dit --batches 2,32

Realistic models are built from configs with random weights (benchmarks/realistic.py) into
--work (default ~/.cache/diffquant/bench). Writes benchmarks/results/runtime_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic import MODELS as REALISTIC  # noqa: E402
from realistic import make_realistic  # noqa: E402

from diffquant._io import write_json, write_text  # noqa: E402
from diffquant.calib_data import CalibConfig, collect  # noqa: E402
from diffquant.engines.cpu import cpu_info  # noqa: E402
from diffquant.engines.ort import fit_weights  # noqa: E402
from diffquant.exporters import export  # noqa: E402
from diffquant.exporters.onnx_fp import fp_onnx_proto  # noqa: E402
from diffquant.models.loading import LoadConfig, load_denoiser  # noqa: E402
from diffquant.passes import load_recipe, quantize  # noqa: E402
from diffquant.quant import apply_plan  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@dataclass
class Graph:
    """One graph file and the runtimes it is timed on; ``fq`` is the fake-quant model it must match."""

    name: str
    bits: str
    path: Path
    runtimes: list[str]
    fq: object = None
    note: str = ""
    file_mb: float = 0.0
    cos_fq: dict = field(default_factory=dict)
    cos_fp: dict = field(default_factory=dict)


def _denoiser(model: str, work: Path):
    if model in REALISTIC:
        folder = make_realistic(model, work / model)
        return load_denoiser(
            str(folder),
            LoadConfig(
                prompts=["a photo of a cat", "a painting of a city at night"] if "unet" in model else ["1", "2"]
            ),
        )
    return load_denoiser(f"builtin:{model}")


def _ours(d, calib, bits: str, work: Path, cpu) -> list[Graph]:
    """W``bits`` minmax plans lowered for both targets; the onnxruntime one as `build` makes it
    here (S8, U8 only where this CPU would saturate) and with all-U8 weights."""
    plan = quantize(d, load_recipe("minmax"), calib, bits=bits, progress=False)
    out = []
    for target in ("onnxruntime", "tensorrt"):
        res = export(plan, d, work / f"{bits}-{target}", target=target)
        fq = copy.deepcopy(d)
        apply_plan(fq.model, plan, target=target)
        if target == "tensorrt":
            out.append(Graph("ours, tensorrt target (FP16, S8·S8)", bits, res.qdq_onnx, ["ort", "ov"], fq))
            continue
        model = onnx.load(str(res.qdq_onnx))
        for mode, label, runtimes in (
            ("auto", "ours, onnxruntime target, S8 weights", ["ort", "ov"]),
            ("u8", "ours, onnxruntime target, U8 weights", ["ort"]),
        ):
            fitted, counts = fit_weights(model, cpu, mode)
            path = work / f"{bits}-{target}" / f"unet.{mode}.onnx"
            onnx.save(fitted, str(path))
            out.append(Graph(label, bits, path, runtimes, fq, note=f"{counts['s8']} S8 / {counts['u8']} U8 weights"))
    return out


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over our recorded inputs."""

    def __init__(self, feeds: list[dict]) -> None:
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def _peers(fp32: Path, feeds: list[dict], work: Path, *, transformer: bool) -> tuple[list[Graph], dict]:
    """The peers' own W8A8 quantizers on the same FP32 graph and calibration inputs (NNCF told
    a transformer is one, as its docs ask)."""
    graphs, skipped = [], {}
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # as its docs ask: pre-process first (without it, the UNet's upsampler sizes break its
        # graph), then its defaults (U8 activations, S8 per-tensor weights)
        pre = work / "peer-ort-pre.onnx"
        if not pre.exists():
            quant_pre_process(str(fp32), str(pre))
        for fmt, label in (
            (QuantFormat.QDQ, "ONNX Runtime quantize_static QDQ (U8S8)"),
            (QuantFormat.QOperator, "ONNX Runtime quantize_static QOperator"),
        ):
            path = work / f"peer-ort-{fmt.name.lower()}.onnx"
            if not path.exists():
                quantize_static(
                    str(pre),
                    str(path),
                    _Reader(feeds),
                    quant_format=fmt,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
            graphs.append(Graph(label, "w8a8", path, ["ort", "ov"] if fmt == QuantFormat.QDQ else ["ort"]))
    except Exception as e:  # a peer that fails is reported, not fatal
        skipped["onnxruntime quantize_static"] = f"{type(e).__name__}: {e}"[:200]
    try:
        import nncf
        import openvino as ov

        path = work / f"peer-nncf{'-transformer' if transformer else ''}.xml"
        if not path.exists():
            kind = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
            q = nncf.quantize(ov.Core().read_model(str(fp32)), nncf.Dataset(feeds), subset_size=len(feeds), **kind)
            ov.save_model(q, str(path), compress_to_fp16=False)
        graphs.append(
            Graph(
                f"OpenVINO NNCF quantize ({'transformer' if transformer else 'default'} preset)", "w8a8", path, ["ov"]
            )
        )
    except Exception as e:
        skipped["nncf"] = f"{type(e).__name__}: {e}"[:200]
    return graphs, skipped


OV_PROBE = """
import sys, numpy as np, openvino as ov
shapes = eval(sys.argv[2])
m = ov.Core().read_model(sys.argv[1])
names = {p: next(n for n in p.get_names() if n in shapes) for p in m.inputs}
m.reshape({p: shapes[n] for p, n in names.items()})
c = ov.Core().compile_model(m, "CPU")
c.create_infer_request().infer({n: np.zeros(shapes[n], p.get_element_type().to_dtype()) for p, n in names.items()})
"""


def ov_survives(path: Path, feeds: dict) -> str:
    """Compile and run a foreign graph on OpenVINO in a child process first: some crash it."""
    shapes = repr({k: list(v.shape) for k, v in feeds.items()})
    p = subprocess.run([sys.executable, "-c", OV_PROBE, str(path), shapes], capture_output=True, text=True)
    return (
        ""
        if p.returncode == 0
        else f"OpenVINO failed on it (exit {p.returncode}: "
        f"{p.stderr.strip().splitlines()[-1][:120] if p.stderr.strip() else 'crashed'})"
    )


def prepare(model: str, work: Path, bits: list[str], calib_samples: int) -> tuple[object, object, list[Graph], dict]:
    """The denoiser, its calibration set, and every graph to time."""
    d = _denoiser(model, work)
    calib = collect(d, CalibConfig(samples=calib_samples, steps=8, timesteps=4), progress=False)
    cpu = cpu_info()
    gdir = work / f"{model}-graphs"
    gdir.mkdir(parents=True, exist_ok=True)
    fp32, fp16 = gdir / "fp32.onnx", gdir / "fp16.onnx"
    onnx.save(fp_onnx_proto(d, "float32"), str(fp32))
    onnx.save(fp_onnx_proto(d, "float16"), str(fp16))
    graphs = [Graph("FP32", "fp32", fp32, ["ort", "ov", "ov-f32"]), Graph("FP16", "fp16", fp16, ["ort"])]
    for b in bits:
        graphs += _ours(d, calib, b, gdir, cpu)
    feeds = [calib.at(ts, 2).numpy() for ts in calib.timesteps]
    peers, skipped = _peers(
        fp32, feeds, gdir, transformer=any(k in type(d.model).__name__ for k in ("Transformer", "DiT"))
    )
    for g in peers:
        why = ov_survives(g.path, feeds[0]) if "ov" in g.runtimes and g.path.suffix == ".onnx" else ""
        if why:
            g.runtimes.remove("ov")
            skipped[f"{g.name} on openvino"] = why
    for g in graphs + peers:
        g.file_mb = sum(p.stat().st_size for p in (g.path, g.path.with_suffix(".bin")) if p.exists()) / 2**20
    return d, calib, graphs + peers, skipped


class Runner:
    """One compiled graph on one runtime with fixed input shapes; ``profile`` dumps ORT's op times."""

    def __init__(self, g: Graph, runtime: str, feeds: dict, threads: int, profile: str = "") -> None:
        self.runtime = runtime
        if runtime == "ort":
            o = ort.SessionOptions()
            o.intra_op_num_threads, o.log_severity_level = threads, 3
            if profile:
                o.enable_profiling, o.profile_file_prefix = True, profile
            self.sess = ort.InferenceSession(str(g.path), o, providers=["CPUExecutionProvider"])
            types = {i.name: i.type for i in self.sess.get_inputs()}
            self.feeds = {
                k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds.items() if k in types
            }
        else:
            import openvino as ov

            core, m = ov.Core(), None
            m = core.read_model(str(g.path))
            names = {p: next(n for n in p.get_names() if n in feeds) for p in m.inputs}
            m.reshape({p: list(feeds[n].shape) for p, n in names.items()})
            props = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            if runtime == "ov-f32":
                props["INFERENCE_PRECISION_HINT"] = "f32"
            self.compiled = core.compile_model(m, "CPU", props)
            self.req = self.compiled.create_infer_request()
            self.feeds = {n: feeds[n].astype(p.get_element_type().to_dtype()) for p, n in names.items()}

    def __call__(self, feeds: dict | None = None) -> np.ndarray:
        f = self.feeds if feeds is None else {k: feeds[k].astype(v.dtype) for k, v in self.feeds.items()}
        if self.runtime == "ort":
            return self.sess.run(None, f)[0]
        return np.array(self.req.infer(f)[self.compiled.outputs[0]])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@torch.no_grad()
def cosines(d, calib, g: Graph, runner: Runner) -> None:
    """Per recorded timestep (batch 2): cosine to FP32 torch, and to the fake-quant model it
    was lowered from (ours); the minimum over timesteps is reported."""
    for ts in calib.timesteps:
        inp = calib.at(ts, 2)
        got = runner(inp.numpy())
        g.cos_fp[runner.runtime] = min(g.cos_fp.get(runner.runtime, 1.0), _cos(d(**inp).numpy(), got))
        if g.fq is not None:
            g.cos_fq[runner.runtime] = min(g.cos_fq.get(runner.runtime, 1.0), _cos(g.fq(**inp).numpy(), got))


def op_shares(prefix_dir: Path, top: int = 6) -> dict[str, float]:
    """Op-type shares of node time from the ONNX Runtime profile in ``prefix_dir``."""
    files = sorted(prefix_dir.glob("*.json"))
    if not files:
        return {}
    per: dict[str, float] = {}
    for ev in json.loads(files[-1].read_text()):
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per[op] = per.get(op, 0.0) + float(ev.get("dur", 0))
    total = sum(per.values()) or 1.0
    return {k: round(v / total, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]}


def time_batch(
    graphs: list[Graph], feeds: dict, a, profile_dir: Path | None, d=None, calib=None, failed: dict | None = None
) -> list[dict]:
    """Time every (graph, runtime) at this batch, interleaved; returns rows without ratios. A
    graph a runtime cannot run is left out and said in ``failed``."""
    runners, shares = [], {}
    for g in graphs:
        for rt in g.runtimes:
            try:
                r = Runner(g, rt, feeds, a.threads)
                r()  # warm up (OpenVINO compiles lazily per shape)
            except Exception as e:  # a peer's graph the runtime rejects is a finding, not a crash
                if failed is not None:
                    failed[f"{g.name} on {rt}"] = f"{type(e).__name__}: {str(e).splitlines()[-1][:200]}"
                continue
            if calib is not None:
                cosines(d, calib, g, r)
            runners.append((g, r, []))
            if profile_dir is not None and rt == "ort":
                pdir = profile_dir / f"{len(runners)}"
                pdir.mkdir(parents=True, exist_ok=True)
                p = Runner(g, rt, feeds, a.threads, profile=str(pdir / "p"))
                p(), p()
                p.sess.end_profiling()
                shares[(g.name, g.bits)] = op_shares(pdir)
                del p
    for _ in range(a.rounds):  # interleave graphs so drift hits all alike
        for _, r, times in runners:
            for _ in range(a.iters):
                t0 = time.perf_counter()
                r()
                times.append(time.perf_counter() - t0)
    rows = []
    for g, r, times in runners:
        rows.append(
            {
                "graph": g.name,
                "runtime": {"ort": "onnxruntime", "ov": "openvino", "ov-f32": "openvino f32"}[r.runtime],
                "bits": g.bits,
                "step_ms_median": float(np.median(times)) * 1000,
                "file_mb": round(g.file_mb, 2),
                "note": g.note,
                "cos_vs_fake_quant": g.cos_fq.get(r.runtime),
                "cos_vs_fp32": g.cos_fp.get(r.runtime),
                "op_shares": shares.get((g.name, g.bits), {}) if r.runtime == "ort" else {},
                "runs": len(times),
            }
        )
    return rows


def bench_model(model: str, a, work: Path) -> tuple[list[dict], dict]:
    d, calib, graphs, skipped = prepare(model, work, a.bits.split(","), a.calib_samples)
    rows = []
    for i, batch in enumerate(int(b) for b in a.batches.split(",")):
        feeds = d.example_inputs(batch).numpy()
        with tempfile.TemporaryDirectory() as prof:
            first = i == 0  # cosines and profiles at the first batch
            got = time_batch(
                graphs, feeds, a, Path(prof) if first else None, d if first else None, calib if first else None, skipped
            )
        base = next(r["step_ms_median"] for r in got if r["graph"] == "FP32" and r["runtime"] == "onnxruntime")
        for r in got:
            r = {"model": model, "batch": batch, **r, "ratio_vs_fp32": r["step_ms_median"] / base}
            rows.append(r)
            print(
                f"{model:10s} b{batch:<3d} {r['runtime']:13s} {r['graph']:46s} {r['bits']:5s} "
                f"{r['step_ms_median']:9.2f} ms  x{r['ratio_vs_fp32']:5.2f}",
                flush=True,
            )
    return rows, skipped


def verdicts(rows: list[dict], batch: int = 2) -> list[str]:
    """The issue's bar per model at ``batch``: our best integer graph <= 0.4x ORT FP32, at least
    as fast as every peer on its runtime, <= 0.8x that runtime's best floating-point mode."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and r["batch"] == batch]
        ours = [r for r in rs if r["graph"].startswith("ours")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["step_ms_median"])
        same = [r for r in rs if r["runtime"].split()[0] == best["runtime"].split()[0]]
        peers = [r for r in same if not r["graph"].startswith("ours") and r["bits"] == "w8a8"]
        floats = [r for r in same if r["bits"] in ("fp32", "fp16")]
        fbest = min(floats, key=lambda r: r["step_ms_median"])
        checks = [
            f"{best['ratio_vs_fp32']:.2f}x ONNX Runtime FP32 ({'ok' if best['ratio_vs_fp32'] <= 0.4 else 'MISSES'} "
            "<= 0.4)",
            f"{best['step_ms_median'] / fbest['step_ms_median']:.2f}x {fbest['runtime']} {fbest['graph']} "
            f"({'ok' if best['step_ms_median'] <= 0.8 * fbest['step_ms_median'] else 'MISSES'} <= 0.8)",
        ]
        for p in peers:
            checks.append(
                f"{best['step_ms_median'] / p['step_ms_median']:.2f}x {p['graph']} "
                f"({'ok' if best['step_ms_median'] <= p['step_ms_median'] else 'SLOWER'})"
            )
        cos = best.get("cos_vs_fake_quant")
        out.append(
            f"- **{model}**, batch {batch}: best is {best['graph']} {best['bits']} on {best['runtime']}, "
            f"{best['step_ms_median']:.1f} ms: "
            + "; ".join(checks)
            + (f"; cosine to fake-quant >= {cos:.4f} on every recorded timestep" if cos is not None else "")
        )
    return out


def write_results(rows: list[dict], skipped: dict, env: dict, a) -> None:
    write_json(
        RESULTS / "runtime_cpu.json",
        {"environment": env, "skipped_peers": skipped, "verdicts": verdicts(rows), "rows": rows},
    )
    lines = [
        "# CPU runtime per denoiser step: ONNX Runtime and OpenVINO, ours and the peers'",
        "",
        f"`python benchmarks/runtime_cpu.py --models {a.models} --batches {a.batches} --bits {a.bits}` on "
        f"**{env['cpu']['model']}** "
        f"({env['cpu']['arch']}; ISA flags: {' '.join(env['cpu']['flags'])}), {a.threads} threads; onnxruntime "
        f"{env['onnxruntime']}, "
        f"openvino {env['openvino']}, nncf {env['nncf']}; {env['date']}. Median of {a.rounds} x {a.iters} runs per "
        "graph and runtime, all "
        "interleaved in one process; **ratio against ONNX Runtime FP32 of the same model and batch**. Random weights "
        "(W8A8/W4A8 minmax plans "
        "from diffquant's stages); cosines are the minimum over the recorded timesteps at batch 2 (fake-quant: the "
        "plan's torch model).",
        "",
        "## Against the bar (batch 2)",
        "",
        *verdicts(rows),
        "",
    ]
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        lines += [
            f"## {model}, batch {batch}",
            "",
            "| graph | runtime | bits | step ms | ratio vs ORT FP32 | file MB | cos vs fake-quant | cos vs FP32 | "
            "weights |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            (r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["step_ms_median"]
        ):
            fq = "–" if r["cos_vs_fake_quant"] is None else f"{r['cos_vs_fake_quant']:.4f}"
            fp = "–" if r["cos_vs_fp32"] is None else f"{r['cos_vs_fp32']:.4f}"
            lines.append(
                f"| {r['graph']} | {r['runtime']} | {r['bits']} | {r['step_ms_median']:.1f} | "
                f"{r['ratio_vs_fp32']:.2f} | {r['file_mb']:.1f} | {fq} | {fp} | {r['note'] or '–'} |"
            )
        lines.append("")
    lines += [
        "## Where ONNX Runtime spends the step (op-type shares of node time, first batch)",
        "",
        "| model | graph | bits | top op types |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["op_shares"]:
            lines.append(
                f"| {r['model']} | {r['graph']} | {r['bits']} | "
                + ", ".join(f"{k} {v:.0%}" for k, v in r["op_shares"].items())
                + " |"
            )
    if skipped:
        lines += ["", "Peers that did not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    write_text(RESULTS / "runtime_cpu.md", "\n".join(lines) + "\n")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except ImportError:
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default="sd-unet,dit-b2",
        help=f"realistic ({', '.join(REALISTIC)}) or builtin (digits-sd, digits-dit)",
    )
    ap.add_argument("--batches", default="2,8", help="engine batch sizes (2 = one image with CFG)")
    ap.add_argument("--bits", default="w8a8,w4a8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--work",
        default=str(Path.home() / ".cache" / "diffquant" / "bench"),
        help="where models and graphs are written",
    )
    a = ap.parse_args()
    torch.manual_seed(0)
    rows, skipped = [], {}
    for model in a.models.split(","):
        r, s = bench_model(model, a, Path(a.work))
        rows += r
        skipped.update({f"{model}: {k}": v for k, v in s.items()})
    env = {
        "cpu": cpu_info().to_dict(),
        "onnxruntime": ort.__version__,
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
        "torch": torch.__version__,
        "threads": a.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    write_results(rows, skipped, env, a)
    print("\n".join(verdicts(rows)))


if __name__ == "__main__":
    main()
