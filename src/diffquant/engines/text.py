"""Prompts -> conditioning without torch: the pipeline's tokenizers (the `tokenizers` library,
padding and truncation stored in each tokenizer.json), its text-encoder engines, and the
family's composition of their outputs as runtime.json ``text`` writes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffquant._check import contained
from diffquant.artifacts import RUNTIME_FILE, TextEntry
from diffquant.engines.base import Engine
from diffquant.errors import DiffquantError

__all__ = ["MAX_PROMPT_CHARS", "TextConditioner", "compose"]

MAX_PROMPT_CHARS = 2000


def compose(expr: list, outs: dict[str, dict[str, np.ndarray]], masks: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Evaluate one composition expression (see `models.families.text`) for ``n`` prompts."""
    op = expr[0]
    if op == "out":
        return outs[expr[1]][expr[2]]
    if op == "mask":
        return masks[expr[1]]
    if op == "cat":
        return np.concatenate([compose(e, outs, masks, n) for e in expr[2:]], axis=int(expr[1]))
    if op == "pad":
        x = compose(expr[2], outs, masks, n)
        width = int(expr[1]) - x.shape[-1]
        if width < 0:  # torch's pad with a negative width crops, and the pipelines rely on it
            return x[..., : int(expr[1])]
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width)])
    if op == "zeros":
        return np.zeros((n, *expr[1]), np.float32)
    raise DiffquantError(
        f"runtime.json: text.compose: unknown operation {op!r}; export the model again with this diffquant"
    )


class TextConditioner:
    """``(prompts) -> {conditioning input: rows}`` with the folder's tokenizers and text-encoder
    engines; ``negative(prompts)`` makes the unconditional rows (zeros where the pipeline forces
    them for an unset negative prompt)."""

    def __init__(self, folder: str | Path, text: TextEntry, engines: dict[str, Engine]) -> None:
        from tokenizers import Tokenizer

        where = f"{Path(folder) / RUNTIME_FILE}: text"
        self.specs, self.compose_exprs, self.unset_negative = text.encoders, text.compose, text.unset_negative
        self.engines = engines
        self.tokenizers = {}
        for i, s in enumerate(self.specs):
            path = contained(folder, s.tokenizer_file, f"{where}.encoders[{i}].tokenizer_file")
            if not path.is_file():
                raise DiffquantError(f"tokenizer file {path} is missing; build the engine folder again")
            try:
                self.tokenizers[s.component] = Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises its own Exception type
                raise DiffquantError(
                    f"tokenizer file {path} is unreadable ({e}); build the engine folder again"
                ) from None

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        for p in prompts:
            if len(p) > MAX_PROMPT_CHARS:
                raise DiffquantError(
                    f"a prompt of {len(p)} characters is over the limit of {MAX_PROMPT_CHARS}; shorten it"
                )
        outs, masks = {}, {}
        for s in self.specs:
            name = s.component
            text = [p.lower().strip() if s.lowercase else p for p in prompts]
            enc = self.tokenizers[name].encode_batch(text)
            ids = np.array([e.ids for e in enc], np.int64)
            masks[name] = np.array([e.attention_mask for e in enc], np.int64)
            feeds = {"input_ids": ids, **({"attention_mask": masks[name]} if s.feed_mask else {})}
            engine = self.engines[name]
            per = getattr(engine, "max_batch", 0) or len(ids)
            runs = [
                engine.run({k: v[i : i + per].astype(engine.input_dtype(k)) for k, v in feeds.items()}, list(s.outputs))
                for i in range(0, len(ids), per)
            ]
            outs[name] = {k: np.concatenate([r[k] for r in runs]).astype(np.float32) for k in s.outputs}
        return {k: compose(e, outs, masks, len(prompts)) for k, e in self.compose_exprs.items()}

    def negative(self, prompts: list[str] | None, n: int) -> dict[str, np.ndarray]:
        """Unconditional rows for ``n`` images: the negative prompts encoded (one for all, or one
        per image), or, when none is given, zeros or the empty prompt as the pipeline does."""
        if prompts is None and self.unset_negative == "zeros":
            rows = self([""])
            return {
                k: np.zeros((n, *v.shape[1:]), v.dtype) if np.issubdtype(v.dtype, np.floating) else np.repeat(v, n, 0)
                for k, v in rows.items()
            }
        prompts = prompts or [""]
        rows = self(list(dict.fromkeys(prompts)))
        index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        pick = np.array([index[prompts[i % len(prompts)]] for i in range(n)])
        return {k: v[pick] for k, v in rows.items()}
