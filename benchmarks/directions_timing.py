"""Timing of the direction families for ``bench_directions``: reference costs on the device,
first-guess cost estimates (for the per-configuration budget), and one (family, D, K)
configuration timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_holograd.protocol import direction_seeds, make_family
from lightning_holograd.protocol.direction_hash import hash_words

FAMILIES = ("gaussian", "rademacher", "sketch", "codebook", "momentum", "sketch-compiled", "rademacher-compiled",
            "sketch-cached", "subsample")
COMPILED_SUFFIX = "-compiled"  # the same family on the fused torch.compile kernels (direction_kernel="compiled")
CACHED_SUFFIX = "-cached"  # the sketch with its slot cache: synthesize after project, as in a step
STATEFUL = ("codebook", "codebook-halfexp", "momentum")
# Assumed single-thread CPU QR rate (flop/s) for the first codebook setup estimate only;
# later estimates are rescaled by what was measured.
_QR_FLOPS_PRIOR = 5e9
# First-guess cost of one call, in units of the references (rescaled by what is measured):
# gaussian about one randn per value, rademacher about an eighth, the sketch a few index_adds.
_PRIOR_X_RANDN = {"gaussian": 1.0, "rademacher": 0.15}
_PRIOR_SKETCH_X_INDEX_ADD = 3.0
_PRIOR_SUBSAMPLE_X_COPY = 3.0  # K hash words and a gather, or a scatter into D zeros


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def measure_references(device: torch.device, dims: list[int], ks: list[int], repeats: int) -> dict[str, Any]:
    """Reference costs in seconds: per D a copy_, one randn(D) and one hash word per
    coordinate; per (D, K) a random-index index_add_ of D floats into K bins."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    refs: dict[str, Any] = {"copy_s": {}, "randn_s": {}, "hash_s": {}, "index_add_s": {}}

    def median(fn: Callable[[], Any]) -> float:
        return statistics.median(_time_call(fn, device, 1, max(3, repeats)))

    for dim in dims:
        src = torch.randn(dim, generator=gen, device=device)
        dst = torch.empty_like(src)
        refs["copy_s"][dim] = median(lambda: dst.copy_(src))
        refs["randn_s"][dim] = median(lambda: dst.normal_(generator=gen))
        refs["hash_s"][dim] = median(lambda: hash_words([12345], 0, dim, device))
        for k in ks:
            index = torch.randint(0, k, (dim,), generator=gen, device=device)
            acc = torch.zeros(k, device=device)
            refs["index_add_s"][f"{dim},{k}"] = median(lambda: acc.index_add_(0, index, src))
        del src, dst
    return refs


def base_family(variant: str) -> str:
    """The family a row measures: "sketch-compiled" -> "sketch"."""
    return variant.removesuffix(COMPILED_SUFFIX).removesuffix(CACHED_SUFFIX)


def compile_seconds(device: torch.device) -> float | None:
    """Wall seconds to compile and check the fused kernels in this process (None: failed)."""
    from lightning_holograd.protocol.direction_kernels import compiled_kernels

    start = time.perf_counter()
    ok = compiled_kernels(device.type) is not None
    return time.perf_counter() - start if ok else None


def _reference(variant: str, dim: int, k: int, refs: dict[str, Any]) -> tuple[str, float]:
    """The reference a family's time is divided by (besides the copy): name, seconds."""
    variant = base_family(variant)
    if variant == "sketch":
        return "index_add", refs["index_add_s"][f"{dim},{k}"]
    if variant == "subsample":  # one pass over D (synthesize fills D zeros) is its floor
        return "copy", refs["copy_s"][dim]
    directions = k - _rank(variant, k) if variant in STATEFUL else k
    if directions == 0:
        return "copy", refs["copy_s"][dim]
    return f"{directions} randn", directions * refs["randn_s"][dim]


def _rank(variant: str, k: int) -> int:
    return {"codebook": k, "codebook-halfexp": k // 2, "momentum": 1}.get(variant, 0)


def prior_estimates(variant: str, dim: int, k: int, refs: dict[str, Any]) -> dict[str, float]:
    """Rough seconds per call (project / synthesize / full_estimate) and for setup."""
    variant = base_family(variant)
    rank = _rank(variant, k)
    _, ref_s = _reference(variant, dim, k, refs)
    matvec = 2 * dim * max(rank, 1) / 2e9 + dim * 4 / 5e9  # small matrix-vector work + one pass
    if variant == "sketch":
        gen = _PRIOR_SKETCH_X_INDEX_ADD * ref_s
    elif variant == "subsample":
        gen = _PRIOR_SUBSAMPLE_X_COPY * ref_s
    else:
        gen = _PRIOR_X_RANDN.get(variant, _PRIOR_X_RANDN["gaussian"]) * ref_s
    est = {"project": gen + matvec, "synthesize": gen + matvec, "full_estimate": 0.0, "setup": 0.0}
    if variant in STATEFUL:
        est["synthesize"] = matvec
        est["full_estimate"] = gen + 3 * matvec
        init_gen = rank * refs["randn_s"][dim]
        qr = 2 * dim * rank * rank / _QR_FLOPS_PRIOR if variant != "momentum" else 0.0
        est["setup"] = init_gen + qr
    return est


# --------------------------------------------------------------------------- one config
def build_family(variant: str, dim: int, k: int, device: torch.device):
    if variant == "codebook":
        fam = make_family("codebook", dim, k, codebook_rank=k)
    elif variant == "codebook-halfexp":
        fam = make_family("codebook", dim, k, codebook_rank=max(1, k // 2))
    else:  # explicit kernels: auto would switch the plain rows to the fused kernels at large D
        kernel = "compiled" if variant.endswith(COMPILED_SUFFIX) else "eager"
        fam = make_family(base_family(variant), dim, k, direction_kernel=kernel)
        if hasattr(fam, "slot_cache"):  # only the -cached row reuses project's slots in synthesize
            fam.slot_cache.enabled = variant.endswith(CACHED_SUFFIX)
    if hasattr(fam, "to"):
        fam.to(device)
    return fam


def run_config(variant: str, dim: int, k: int, device: torch.device, args, refs: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"family": variant, "D": dim, "K": k, "status": "ok"}
    _sync(device)
    t0 = time.perf_counter()
    fam = build_family(variant, dim, k, device)
    _sync(device)
    row["setup_s"] = time.perf_counter() - t0 if variant in STATEFUL else None
    row["rank"] = getattr(fam, "rank", None)
    row["num_exploration"] = getattr(fam, "num_exploration", None)

    seeds = direction_seeds(b"bench-directions", fam.num_seeds)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    grad = torch.randn(dim, generator=gen).to(device)
    scalars = fam.project(grad, seeds)

    ops: dict[str, Callable[[], Any]] = {
        "project": lambda: fam.project(grad, seeds),
        "synthesize": lambda: fam.synthesize(scalars, seeds),
    }
    if hasattr(fam, "clear_picks"):  # subsample: every call draws its picks, as a new step's seed would
        ops = {name: (lambda fn=fn: (fam.clear_picks(), fn())) for name, fn in ops.items()}
    if variant in STATEFUL:
        ops["full_estimate"] = lambda: fam.full_estimate(scalars, seeds)
    for name, fn in ops.items():
        times = _time_call(fn, device, args.warmup, args.repeats)
        row[f"{name}_times_s"] = times
        row[f"{name}_s"] = statistics.median(times)

    synth_s = row.get("full_estimate_s", row["synthesize_s"])  # what a step pays to synthesise
    row["copy_s"] = refs["copy_s"][dim]
    row["project_x_copy"] = row["project_s"] / row["copy_s"]
    row["synthesize_x_copy"] = synth_s / row["copy_s"]
    row["reference"], row["reference_s"] = _reference(variant, dim, k, refs)
    row["project_x_ref"] = row["project_s"] / row["reference_s"]
    row["synthesize_x_ref"] = synth_s / row["reference_s"]
    del fam, grad, scalars
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


