"""CPU runtime table: per denoiser step on digits-sd and digits-dit, FP32 ONNX vs the W8A8
ONNX-Runtime-target graph vs the TensorRT-target graph run by ONNX Runtime, plus W4 weight-only
GEMM graphs and file sizes. One process, graphs interleaved round by round, medians.

    python benchmarks/runtime_cpu.py [--batches 2,32] [--rounds 7] [--iters 20]

Writes benchmarks/results/runtime_cpu.md and benchmarks/results/runtime_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from diffquant._io import write_json, write_text
from diffquant.calib_data import CalibConfig, collect
from diffquant.exporters import export
from diffquant.exporters.onnx_fp import fp_onnx_proto
from diffquant.models.loading import load_denoiser
from diffquant.pipeline import load_recipe, quantize

RESULTS = Path(__file__).parent / "results"
FUSED_OPS = ("QLinearConv", "MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul")


def _session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    if optimized is not None:
        o.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def _feeds(sess: ort.InferenceSession, denoiser, batch: int) -> dict:
    half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
    return {k: v.astype(np.float16) if k in half else v for k, v in denoiser.example_inputs(batch).numpy().items()}


def _graphs(model: str, work: Path) -> list[dict]:
    d = load_denoiser(f"builtin:{model}")
    calib = collect(d, CalibConfig(samples=64), progress=False)
    rows = []
    fp32 = work / f"{model}.fp32.onnx"
    onnx.save(fp_onnx_proto(d, "float32"), str(fp32))
    fp16 = work / f"{model}.fp16.onnx"
    onnx.save(fp_onnx_proto(d, "float16"), str(fp16))
    rows += [dict(graph="fp32", bits="fp32", path=fp32), dict(graph="fp16 (no Q/DQ)", bits="fp16", path=fp16)]
    for bits, target, label in [("w8a8", "tensorrt", "tensorrt-target Q/DQ (FP16)"), ("w8a8", "onnxruntime", "onnxruntime-target Q/DQ"), ("w4g64a16", "onnxruntime", "W4-GEMM weight-only (onnxruntime)")]:
        plan = quantize(d, load_recipe("minmax"), calib, bits=bits, progress=False)
        res = export(plan, d, work / f"{model}-{bits}-{target}", target=target)
        rows.append(dict(graph=label, bits=bits, path=res.qdq_onnx))
    return d, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-sd,digits-dit")
    ap.add_argument("--batches", default="2,32", help="engine batch sizes (2 = one image with CFG)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    out_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in a.models.split(","):
            d, graphs = _graphs(model, work)
            for g in graphs:
                opt = work / "opt.onnx"
                _session(g["path"], a.threads, opt)
                ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
                g["fused"] = {k: ops[k] for k in FUSED_OPS if ops[k]}
                g["file_mb"] = g["path"].stat().st_size / 2**20
            for batch in (int(b) for b in a.batches.split(",")):
                sessions = [(g, _session(g["path"], a.threads)) for g in graphs]
                feeds = [_feeds(s, d, batch) for _, s in sessions]
                times = {g["graph"]: [] for g in graphs}
                for _ in range(a.rounds):  # interleave graphs so drift hits all alike
                    for (g, s), f in zip(sessions, feeds):
                        s.run(None, f)
                        for _ in range(a.iters):
                            t0 = time.perf_counter()
                            s.run(None, f)
                            times[g["graph"]].append(time.perf_counter() - t0)
                base = float(np.median(times["fp32"]))
                for g in graphs:
                    med = float(np.median(times[g["graph"]]))
                    out_rows.append(
                        {
                            "model": model,
                            "graph": g["graph"],
                            "bits": g["bits"],
                            "batch": batch,
                            "step_ms_median": med * 1000,
                            "ratio_vs_fp32": med / base,
                            "file_mb": g["file_mb"],
                            "fused_ops": g["fused"],
                            "runs": len(times[g["graph"]]),
                        }
                    )
                    print(f"{model:10s} b{batch:<3d} {g['graph']:36s} {med * 1000:8.3f} ms  x{med / base:5.2f}  {g['file_mb']:6.2f} MB  {g['fused']}")
    env = {"onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(), "threads": a.threads, "date": time.strftime("%Y-%m-%d")}
    write_json(RESULTS / "runtime_cpu.json", {"environment": env, "rows": out_rows})
    lines = [
        "# CPU runtime per denoiser step (ONNX Runtime)",
        "",
        f"`python benchmarks/runtime_cpu.py` on {env['cpu']}, {a.threads} threads, onnxruntime {env['onnxruntime']}, {env['date']}. "
        f"Median of {a.rounds} x {a.iters} runs per graph, graphs interleaved; ratio against the FP32 graph at the same batch.",
        "",
        "| model | graph | bits | batch | step ms (median) | ratio vs FP32 | file MB | fused kernels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out_rows:
        fused = ", ".join(f"{k} {v}" for k, v in r["fused_ops"].items()) or "–"
        lines.append(f"| {r['model']} | {r['graph']} | {r['bits']} | {r['batch']} | {r['step_ms_median']:.2f} | {r['ratio_vs_fp32']:.2f} | {r['file_mb']:.2f} | {fused} |")
    write_text(RESULTS / "runtime_cpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
