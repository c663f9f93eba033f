"""Quality: each quant's KL divergence and perplexity against a reference model, by llama-perplexity's protocol.

llama.cpp's ``tools/perplexity``: the text is tokenized once (with BOS where the vocabulary adds it) and cut into
non-overlapping chunks of ``n_ctx`` tokens; each chunk is decoded from an empty cache with its first token set to
BOS, and only the second half is scored (``first = n_ctx/2``: positions first .. n_ctx-2 predict the next token).
``--kl-divergence-base`` stores the reference's log-probabilities in 16 bits per vocabulary entry (a scale and
an offset per token, entries below max - 16 dropped); ``--kl-divergence`` scores a quant against them: PPL(Q) and
PPL(base) with their uncertainty, ln(PPL(Q)/PPL(base)), the KL divergence per token (mean ± error, median,
percentiles, max), "same top p" (both models rank the same token first) and Δp = p(Q) - p(base) of the right
token. The arithmetic here is that one, step for step (the 16-bit reference included), in numpy.

Design, for bounded memory and time: llama-perplexity writes the reference's log-probabilities for the whole text
to a file (~10 GB for a 1B model over wikitext-2). Here the reference and every quant are loaded together in one
process and the text is walked chunk by chunk: the reference's 16-bit log-probabilities of one chunk
((n_ctx/2) x n_vocab x 2 bytes: 65 MB for Llama 3.2 1B, 25 MB for SmolLM2) are held only while each quant scores
that chunk, so memory is the models (mapped) plus one chunk, and the reference decodes each chunk once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
DEFAULT_TEXT_NAME = ("the GNU General Public License v3 (Debian's /usr/share/common-licenses/GPL-3; "
                     "verbatim copies permitted)")


class QualityError(RuntimeError):
    pass


def text_info(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    name = DEFAULT_TEXT_NAME if path == DEFAULT_TEXT else path.name
    return {"text_path": str(path), "text_name": name, "text_sha256": hashlib.sha256(data).hexdigest(),
            "text_bytes": len(data)}


class Model:
    """A model and one context of n_ctx tokens, decoding chunks with logits for their second half."""

    def __init__(self, path: str, n_ctx: int, threads: int, n_gpu_layers: int):
        import llama_cpp

        self.lib = llama_cpp
        self.path = path
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise QualityError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_meta_val_str(self.model, b"general.architecture", buf, len(buf))
        self.arch = buf.value.decode(errors="replace")
        llama_cpp.llama_model_meta_val_str(self.model, b"tokenizer.ggml.model", buf, len(buf))
        self.tokenizer = buf.value.decode(errors="replace")
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        self.desc = buf.value.decode(errors="replace")
        self.size_bytes = int(llama_cpp.llama_model_size(self.model))
        self.n_params = int(llama_cpp.llama_model_n_params(self.model))
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx  # one chunk per decode: one sequence of n_ctx tokens (llama-perplexity -b n_ctx)
        cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        cp.n_seq_max = 1
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise QualityError(f"llama.cpp could not make a context of {n_ctx} tokens for {path}")
        self.n_ctx = n_ctx
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        toks = (self.lib.llama_token * cap)()
        # add_special (BOS where the vocabulary adds it), no parse_special: as common_tokenize(ctx, text, true)
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), toks, cap, True, False)
        if n < 0:
            raise QualityError("the text does not tokenize")
        return np.frombuffer(toks, dtype=np.int32, count=n).copy()

    def chunk_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits of positions n_ctx/2 .. n_ctx-1 of one chunk ([n_ctx - n_ctx/2, n_vocab] float32)."""
        lib, b, n = self.lib, self.batch, self.n_ctx
        first = n // 2
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        toks = tokens.astype(np.int32).copy()
        if self.add_bos:
            toks[0] = self.bos
        ctypes.memmove(b.token, toks.ctypes.data, n * 4)
        pos = np.arange(n, dtype=np.int32)
        ctypes.memmove(b.pos, pos.ctypes.data, n * 4)
        flags = (pos >= first).astype(np.int8)
        ctypes.memmove(b.logits, flags.ctypes.data, n)
        for i in range(n):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        b.n_tokens = n
        rc = lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise QualityError(f"llama_decode failed with code {rc} on {self.path}")
        ptr = lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n - first, self.n_vocab)).copy()

    def free(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


def base_log_probs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama-perplexity's 16-bit log-probabilities of the reference, row by row: (q uint16 [rows, n_vocab],
    scale [rows], min_log_prob [rows]); a log-probability is scale * q + min_log_prob."""
    lg = logits.astype(np.float32)
    mx = lg.max(axis=1)
    mn = np.maximum(lg.min(axis=1), mx - np.float32(16))
    lse = np.log(np.exp((lg - mx[:, None]).astype(np.float32)).astype(np.float64).sum(axis=1)).astype(np.float32)
    min_lp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / np.float32(65535)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        q = np.where(lg > mn[:, None], np.rint(inv[:, None] * (lg - mn[:, None])), 0)
    return q.astype(np.uint16), scale, min_lp


class Stats:
    """llama-perplexity's running sums and per-token values (kl_divergence_result)."""

    def __init__(self):
        self.s = {k: 0.0 for k in ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "dp",
                                   "dp2", "dp4")}
        self.same_top = 0
        self.count = 0
        self.kld_values: list[np.ndarray] = []
        self.dp_values: list[np.ndarray] = []

    def add(self, logits: np.ndarray, base: tuple[np.ndarray, np.ndarray, np.ndarray], next_tokens: np.ndarray):
        q, scale, min_lp = base
        rows = len(next_tokens)
        lg = logits[:rows].astype(np.float32)
        q = q[:rows]
        mx = lg.max(axis=1)
        imax = lg.argmax(axis=1)
        lse = np.log(np.exp(lg - mx[:, None]).astype(np.float64).sum(axis=1)).astype(np.float32)
        idx = np.arange(rows)
        nll = (mx + lse - lg[idx, next_tokens]).astype(np.float32)
        plb = (scale[:rows, None] * q.astype(np.float32) + min_lp[:rows, None]).astype(np.float32)
        nll_base = -plb[idx, next_tokens]
        top = (mx + lse).astype(np.float32)
        keep = plb > np.float32(-16)
        terms = np.where(keep, np.exp(plb).astype(np.float64) * (plb - lg + top[:, None]).astype(np.float64), 0.0)
        kld = terms.sum(axis=1)
        imax_base = plb.argmax(axis=1)
        p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
        s = self.s
        s["nll"] += float(nll.astype(np.float64).sum())
        s["nll2"] += float((nll.astype(np.float64) ** 2).sum())
        s["nll_base"] += float(nll_base.astype(np.float64).sum())
        s["nll_base2"] += float((nll_base.astype(np.float64) ** 2).sum())
        s["nll_nll_base"] += float((nll.astype(np.float64) * nll_base).sum())
        s["kld"] += float(kld.sum())
        s["kld2"] += float((kld ** 2).sum())
        d2 = p_diff.astype(np.float64) ** 2
        s["dp"] += float(p_diff.astype(np.float64).sum())
        s["dp2"] += float(d2.sum())
        s["dp4"] += float((d2 ** 2).sum())
        self.same_top += int((imax == imax_base).sum())
        self.count += rows
        self.kld_values.append(kld.astype(np.float32))
        self.dp_values.append(p_diff)

    def result(self) -> dict[str, Any]:
        """The statistics llama-perplexity prints at the end of a --kl-divergence run, with its formulas."""
        s, n = self.s, self.count

        def mu(a, a2):
            if n < 1:
                return 0.0, 0.0
            f = a / n
            df = a2 / n - f * f
            return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

        def cov(a, b, ab):
            return 0.0 if n < 10 else (ab / n - (a / n) * (b / n)) / (n - 1)

        lp, lp_u = mu(s["nll"], s["nll2"])
        lb, lb_u = mu(s["nll_base"], s["nll_base2"])
        c = cov(s["nll"], s["nll_base"], s["nll_nll_base"])
        ratio, ratio_u = lp - lb, math.sqrt(max(lp_u ** 2 + lb_u ** 2 - 2 * c, 0.0))
        kl, kl_u = mu(s["kld"], s["kld2"])
        dpm, dpm_u = mu(s["dp"], s["dp2"])
        mse, mse_u = mu(s["dp2"], s["dp4"])
        rms = math.sqrt(mse)
        top = self.same_top / n if n else 0.0
        kv = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1, np.float32)
        dv = np.sort(np.concatenate(self.dp_values)) if self.dp_values else np.zeros(1, np.float32)
        ppl, pplb = math.exp(lp), math.exp(lb)
        return {
            "n_tokens_scored": n, "ppl": ppl, "ppl_unc": ppl * lp_u, "ppl_base": pplb, "ppl_base_unc": pplb * lb_u,
            "ln_ppl_ratio": ratio, "ln_ppl_ratio_unc": ratio_u, "ppl_ratio": math.exp(ratio),
            "ppl_ratio_unc": math.exp(ratio) * ratio_u,
            "kld_mean": kl, "kld_unc": kl_u, "kld_median": _median(kv), "kld_max": float(kv[-1]),
            **{f"kld_p{_pname(f)}": _percentile(kv, f) for f in (0.999, 0.99, 0.95, 0.90)},
            "same_top": top, "same_top_unc": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
            "dp_mean": dpm, "dp_mean_unc": dpm_u, "dp_rms": rms, "dp_rms_unc": 0.5 / rms * mse_u if rms else 0.0,
            "dp_max": float(dv[-1]), "dp_min": float(dv[0]), "dp_median": _median(dv),
            **{f"dp_p{_pname(f)}": _percentile(dv, f) for f in (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)},
        }


def _pname(f: float) -> str:
    return f"{f * 100:g}".replace(".", "_")


def _median(v: np.ndarray) -> float:
    n = len(v)
    return float(0.5 * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])


def _percentile(v: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear between the two nearest sorted values."""
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(len(v) - 1)
    ip = int(p)
    p = p - ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def measure(ref_path: str, quants: dict[str, str], text: str, n_ctx: int, chunks: int | None, threads: int,
            n_gpu_layers: int, emit: Callable[[str, dict[str, Any], dict[str, Any]], None],
            progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Score every quant ({label: path}) against the reference on `text`, chunk by chunk; at the end
    emit(label, statistics, run facts (tokens, chunks, wall time, the model's description)) per quant. Returns
    what every quant shares (tokens, chunks)."""
    ref = Model(ref_path, n_ctx, threads, n_gpu_layers)
    models: dict[str, Model] = {}
    try:
        for label, p in quants.items():
            m = Model(p, n_ctx, threads, n_gpu_layers)
            models[label] = m
            if (m.arch, m.n_vocab, m.tokenizer) != (ref.arch, ref.n_vocab, ref.tokenizer):
                raise QualityError(f"{label} ({m.arch}, {m.n_vocab} tokens, {m.tokenizer} tokenizer) and the "
                                   f"reference {Path(ref_path).name} ({ref.arch}, {ref.n_vocab} tokens, "
                                   f"{ref.tokenizer}) differ in architecture or vocabulary: a KL divergence "
                                   "between them means nothing")
        tokens = ref.tokenize(text)
        n_max = len(tokens) // n_ctx
        if len(tokens) < 2 * n_ctx:
            raise QualityError(f"the text tokenizes to {len(tokens)} tokens: at least {2 * n_ctx} are needed for "
                               f"n_ctx {n_ctx} (llama-perplexity's rule)")
        n_chunk = n_max if chunks is None else min(chunks, n_max)
        stats = {label: Stats() for label in models}
        walls = {label: 0 for label in models}
        t_ref = 0
        first = n_ctx // 2
        for c in range(n_chunk):
            progress(f"chunk {c + 1}/{n_chunk}")
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            t0 = time.perf_counter_ns()
            base = base_log_probs(ref.chunk_logits(chunk))
            t_ref += time.perf_counter_ns() - t0
            nxt = chunk[first + 1:]  # positions first .. n_ctx-2 predict these
            for label, m in models.items():
                t0 = time.perf_counter_ns()
                stats[label].add(m.chunk_logits(chunk), base, nxt)
                walls[label] += time.perf_counter_ns() - t0
            del base
        shared = {"n_tokens_text": int(len(tokens)), "n_chunks": n_chunk, "n_chunks_max": n_max, "n_ctx": n_ctx,
                  "reference_wall_ns": t_ref}
        for label in models:
            m = models[label]
            emit(label, stats[label].result(), {**shared, "wall_ns": walls[label] + t_ref, "model_desc": m.desc,
                                                "model_size_bytes": m.size_bytes, "model_n_params": m.n_params})
        return shared
    finally:
        for m in models.values():
            m.free()
        ref.free()
