"""Result rows that survive a re-run: each records the commit it was computed at, a hash of its
settings and its seeds; processes merge their rows into one results file as each row finishes
(under a lock, so seeds can run in parallel and a stopped run resumes); a row counts only while
its code is today's (same ``src/`` as HEAD, or proven identical by the fingerprint); tables give
mean ± 95 % t-interval over the calibration seeds, and verdicts come from `eval.stats`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from diffquant._io import write_json
from diffquant.eval.stats import Interval, Verdict, paired_verdict, t_interval

__all__ = [
    "KEYS",
    "current",
    "group_rows",
    "head_commit",
    "interval",
    "key_of",
    "save_rows",
    "settings_hash",
    "table_rows",
    "verdict",
]

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("model", "recipe", "bits", "graph", "n_samples", "replicate")
OLD_CALIB_SEED = 1234  # what every row without a seed was calibrated with (CalibConfig's default)


def key_of(row: dict) -> tuple:
    """A row's identity: what it measured and which replicate (old rows: replicate 1234)."""
    return tuple(row.get(k, OLD_CALIB_SEED if k == "replicate" else None) for k in KEYS)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@cache
def head_commit() -> str:
    """The commit rows are computed at ("" outside a git checkout), marked ``+dirty`` when
    ``src/`` has uncommitted changes (such a row is never current: its code is not a commit)."""
    commit = _git("rev-parse", "HEAD")
    return commit + ("+dirty" if commit and _git("status", "--porcelain", "src") else "")


@cache
def _same_code(commit: str) -> bool:
    """``src/`` at ``commit`` is HEAD's, or the recorded fingerprint proves them identical."""
    if not commit or commit.endswith("+dirty"):
        return False
    if commit == head_commit() or not _git("diff", "--name-only", commit, "HEAD", "--", "src"):
        return _git("cat-file", "-t", commit) == "commit"
    fp = ROOT / "benchmarks" / "results" / "fingerprint.json"
    meta = json.loads(fp.read_text()).get("_meta", {}) if fp.exists() else {}
    proven = meta.get("compared_identical_to", {}).get("commit", "")
    return commit == proven and _same_code(meta.get("commit", ""))


def current(row: dict) -> bool:
    """Computed by today's code (rows from before commits were recorded never are)."""
    return _same_code(row.get("commit", ""))


def settings_hash(settings: dict) -> str:
    """A short hash of what a row depends on besides the code (recipe, bits, overrides, N, seeds)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_rows(path: Path, new: list[dict]) -> list[dict]:
    """Merge ``new`` into the results file (same key replaced) under a lock; every row after it."""
    with _locked(path):
        rows = json.loads(path.read_text()) if path.exists() else []
        keys = {key_of(r) for r in new}
        rows = [r for r in rows if key_of(r) not in keys] + new
        write_json(path, rows)
    return rows


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Current rows by what they measured (every key but the replicate), replicates together."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        if current(r):
            out.setdefault(key_of(r)[:-1], []).append(r)
    return out


def interval(group: list[dict], metric: str) -> Interval | None:
    """Mean and t-interval of ``metric`` over a group's replicates (None where no row has it)."""
    vals = [r[metric] for r in group if r.get(metric) is not None]
    return t_interval(vals) if vals else None


def verdict(groups: dict[tuple, list[dict]], a: tuple, b: tuple, metric: str, *, lower_is_better: bool) -> Verdict:
    """Row group ``a`` against ``b`` (keys without the replicate), paired by calibration seed."""
    per = [{r["replicate"]: r[metric] for r in groups.get(k, []) if r.get(metric) is not None} for k in (a, b)]
    return paired_verdict(f"{a[1]} {a[2]}", f"{b[1]} {b[2]}", per[0], per[1], metric, lower_is_better=lower_is_better)


def table_rows(rows: list[dict], first_seed: int) -> list[dict]:
    """One row per measurement for the single-number detail tables (tcaq.md, qua2sedimo.md): the
    current replicate of ``first_seed`` (else the lowest current one), else the stale row, with
    ``stale`` set so the table can say so."""
    best: dict[tuple, tuple] = {}
    for r in rows:
        rank = (not current(r), key_of(r)[-1] != first_seed, key_of(r)[-1])
        k = key_of(r)[:-1]
        if k not in best or rank < best[k][0]:
            best[k] = (rank, r)
    return [{**r, "stale": rank[0]} for rank, r in best.values()]
