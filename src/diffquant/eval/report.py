"""The run report: report.json, a readable report.md, and PNG sample grids."""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant._io import write_text
from diffquant._png import save_grid_array
from diffquant.artifacts import RunReport
from diffquant.quant.plan import PassReport

__all__ = ["SMALL_N", "collapse_note", "save_grid", "write_markdown"]

SMALL_N = 500  # below this FD is dominated by its small-sample bias (published tables use N = 1000)


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    ncol: int = 10,
    zoom: int = 3,
    pad: int = 2,
    title: str = "",
    row_labels: list[str] | None = None,
) -> Path:
    """Save images in [-1, 1] [N, C, H, W] (C = 1 or 3) as a grid PNG (``ncol`` per row), with an
    optional title and row labels."""
    return save_grid_array(
        images.detach().float().numpy(), path, ncol=ncol, zoom=zoom, pad=pad, title=title, row_labels=row_labels
    )


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def collapse_note(quality: dict) -> str:
    """A sentence when the fake-quant model itself has collapsed (accuracy near chance, or
    images unrelated to FP): then end-to-end parity fails because the quantized model is
    chaotic, not because of the deployment."""
    fq = quality.get("fake_quant", {})
    acc, psnr = fq.get("accuracy"), fq.get("psnr")
    if (acc is not None and acc < 0.5) or (psnr is not None and psnr < 10.0):
        shown = ", ".join(f"{k} {v:.3g}" for k, v in (("accuracy", acc), ("PSNR vs FP dB", psnr)) if v is not None)
        return (
            f"the fake-quant model itself has collapsed ({shown}): at these bits the quantized model no longer "
            "follows the FP one, "
            "and tiny rounding differences send its trajectory elsewhere; give it more bits or a stronger recipe"
        )
    return ""


def write_markdown(report: RunReport, path: str | Path) -> Path:
    """A report a person can read: settings, quality table, parity verdicts, realized formats,
    the plan and its passes' tables."""
    sections = (_quality, _noise, _parity, _timings, _realized, _plan, _pass_files)
    return write_text(path, "\n".join(line for section in sections for line in section(report)) + "\n")


def _quality(report: RunReport) -> list[str]:
    fam, st = report.family, report.settings
    lines = [
        f"# diffquant run: {report.model} · {report.recipe} · {report.bits} · target {report.target}",
        "",
        f"Deployed graph: `{report.onnx}` (run by ONNX Runtime, CPU). Family {fam.get('family', '?')}, "
        f"{fam.get('sampler', 'ddim')} sampler, {st['steps']} steps, guidance {st['guidance']} "
        f"({fam.get('guidance', 'cfg')}), samples {st['samples']}, seed {st['seed']}.",
        "",
        "## Quality",
        "",
        "| model | FD ↓ | accuracy ↑ | PSNR vs FP ↑ | SSIM vs FP ↑ | final-latent cosine ↑ |",
        "|---|---|---|---|---|---|",
    ]
    rows = (("FP32 (torch)", "fp"), ("fake-quant (torch)", "fake_quant"), ("**deployed graph (ORT)**", "quant"))
    for label, key in rows:
        r = report.quality[key]
        cells = " | ".join(_fmt(r.get(k)) for k in ("fd", "accuracy", "psnr", "ssim", "latent_cosine"))
        lines.append(f"| {label} | {cells} |")
    n_note = (
        f" **N = {st['samples']} is too small for FD to mean much**: FD is biased upward and noisy at small N; compare "
        f"FD only between runs of equal N (published tables use N = 1000)."
        if st["samples"] < SMALL_N
        else ""
    )
    collapsed = collapse_note(report.quality)
    return [
        *lines,
        "",
        *([f"**Collapsed**: {collapsed}.", ""] if collapsed else []),
        f"FD and accuracy need a feature model (the digits classifier, builtin models only); PSNR / SSIM compare "
        f"decoded images with the FP pipeline's from the same seeds and prompts.{n_note}",
    ]


def _noise(report: RunReport) -> list[str]:
    lines = [
        "",
        "| timestep | fake-quant noise SNR dB | fake-quant cosine | deployed noise SNR dB | deployed cosine |",
        "|---|---|---|---|---|",
    ]
    for r in report.noise_fidelity:
        fq, q = r["fake_quant"], r["quant"]
        lines.append(
            f"| {r['timestep']:g} | {fq['snr_db']:.1f} | {fq['cosine']:.5f} | {q['snr_db']:.1f} | {q['cosine']:.5f} |"
        )
    return [
        *lines,
        "",
        "Sample grids (same seeds and prompts): FP `samples_fp.png`, fake-quant `samples_fake_quant.png`, "
        "deployed `samples_quant.png`, side by side `samples_compare.png`.",
        "",
        "![FP | fake-quant | deployed](samples_compare.png)",
    ]


def _parity(report: RunReport) -> list[str]:
    p = report.parity
    lines = [
        "",
        "## Parity: deployed graph vs torch fake-quant",
        "",
        f"Verdict: **{'PASS' if p['passed'] else 'FAIL'}** — local max step error {_fmt(p['max_step_error'])} "
        f"(tolerance {_fmt(p['step_tolerance'])}; weights {_fmt(p['weight_max_step_error'])}), "
        f"min cosine {_fmt(p['cosine_min'])} (threshold {_fmt(p['cosine_threshold'])}), max abs {_fmt(p['max_abs'])}, "
        f"activation code flip rate {_fmt(p['flip_rate'])}.",
        "",
        "| timestep | max abs | cosine | SNR dB | local step error | flip rate | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in p["per_timestep"]:
        lines.append(
            f"| {t['timestep']:g} | {_fmt(t['max_abs'])} | {t['cosine']:.6f} | {t['snr_db']:.1f} | "
            f"{_fmt(t['max_step_error'])} | {t['flip_rate']:.2e} | {'pass' if t['passed'] else 'FAIL'} |"
        )
    return [
        *lines,
        "",
        "Local step error judges each graph quantizer on its own input (DequantizeLinear output vs torch fake-quant of "
        "the tensor its QuantizeLinear read); it is the contract that the graph computes what was calibrated. The "
        "end-to-end figures compare the FP16 deployed graph with the FP32 fake-quant model: FP16 rounding moves some "
        "inputs across rounding boundaries and the flips propagate (flip rate), and near t = 0 the noise prediction is "
        "ill-conditioned (x_t is almost x_0), so a small latent difference shows up as a large one in the output.",
    ]


def _timings(report: RunReport) -> list[str]:
    t = report.timings
    return [
        "",
        "## Timings (s)",
        "",
        "| " + " | ".join(t) + " |",
        "|" + "---|" * len(t),
        "| " + " | ".join(f"{v:.1f}" for v in t.values()) + " |",
    ]


def _realized(report: RunReport) -> list[str]:
    lines = ["", "## Realized per node", "", "| layer | op | weights | activations |", "|---|---|---|---|"]
    lines += [f"| {name} | {i['op']} | {i['weight']} | {i['act']} |" for name, i in report.realized.items()]
    return lines + [f"| {name} | – | FP16 ({rule}) | FP16 |" for name, rule in report.skipped.items()]


def _plan(report: RunReport) -> list[str]:
    """What the plan's weights cost, and the tables the recipe's passes left."""
    b = report.plan_bits
    out = ["", "## Plan", ""]
    if b:
        out.append(
            f"Average weight bits {b['weight_bits']:.3f} ({b['weight_bits_with_scales']:.3f} with the FP16 scales); "
            f"activation widths {', '.join(map(str, b['act_bits'])) or 'FP'}; asked {b['request']}."
        )
    for r in report.pass_reports:
        out += ["", PassReport.from_dict(r).markdown()]
    return out


def _pass_files(report: RunReport) -> list[str]:
    """The files the passes' report hooks wrote beside this report."""
    if not report.pass_files:
        return []
    links = ", ".join(f"[{f}]({f})" for f in report.pass_files if f.endswith(".md")) or ", ".join(report.pass_files)
    return ["", "## Pass reports", "", f"Written by the recipe's passes beside this report: {links}."]
