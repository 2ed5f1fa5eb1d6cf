"""Structured orthonormal bases for the codebook (docs/PROTOCOL.md §5).

Symbols: D coordinates of the flat gradient g, which is the concatenation of the
parameters' gradients in order; r basis scalars per step (``rank``). A *segment* is one
parameter's slice of g. A layout gives every segment one block:

- ``VectorBlock``: k orthonormal columns V (d, k) over the segment's d coordinates;
  scalars V^T g_seg (k,).
- ``FactorBlock``: the segment read as a matrix G (m, n) (a parameter of shape
  (m, ...) flattened to (m, prod(rest)), row-major like ``tensor.view``), a left basis
  L (m, k) and a right basis R (n, k), each with orthonormal columns; scalars
  vec(L^T G R) (k^2,, row-major). Its columns in R^D are vec(l_i r_j^T), orthonormal
  because L and R are (PowerSGD-like factors, but two-sided: k^2 scalars, not (m + n) k).

Blocks act on disjoint coordinates, so U (D, r), the blocks' columns side by side, has
orthonormal columns whenever every block's bases do. Scalars are laid out block after
block in parameter order. Slots past the blocks' total are *idle*: their column is
zero and their scalar is 0 (a factor block grows in squares, so a few slots can be
left over when no 1-D parameter takes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FactorBlock", "Layout", "Segment", "VectorBlock", "orthonormalize", "segments_from_shapes"]


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR with a positive diagonal of R (a unique, reproducible basis).

    Computed in float64 (float32 Householder QR of a tall D x r matrix leaves errors of
    ~sqrt(D) eps, 4e-4 at D = 446k) and returned in the input's dtype.
    """
    q, r = torch.linalg.qr(matrix.double(), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(matrix.dtype)


class Segment:
    """One parameter's slice [offset, offset + size) of g, read as ``rows`` x ``cols``.

    1-D parameters (and a flat gradient without shapes) have cols = 1 and are never factored.
    """

    def __init__(self, offset: int, shape: Sequence[int]) -> None:
        self.offset = offset
        self.shape = tuple(int(s) for s in shape)
        self.rows = self.shape[0] if self.shape else 1
        self.size = 1
        for s in self.shape:
            self.size *= s
        self.cols = self.size // self.rows if len(self.shape) >= 2 else 1

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2 and self.rows > 1 and self.cols > 1

    def slice(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.size]


def segments_from_shapes(dim: int, param_shapes: Sequence[Sequence[int]] | None) -> list[Segment]:
    """Segments of g in parameter order; without shapes, g is one 1-D segment."""
    if param_shapes is None:
        return [Segment(0, (dim,))]
    segments, offset = [], 0
    for index, shape in enumerate(param_shapes):
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape) or not len(shape):
            raise ValueError(
                f"param_shapes[{index}]={tuple(shape)!r} must be a non-empty shape of positive integers. "
                "HINT: pass [tuple(p.shape) for p in trainable_parameters], scalars as (1,)."
            )
        segments.append(Segment(offset, shape))
        offset += segments[-1].size
    if offset != dim:
        raise ValueError(
            f"param_shapes cover {offset} coordinates, the flat gradient has dim={dim}. HINT: list the shapes of "
            "exactly the trainable parameters, in the order their gradients are concatenated."
        )
    return segments


class VectorBlock:
    """Columns V (d, k) over one segment; scalars V^T g_seg."""

    kind = "vector"

    def __init__(self, segment: Segment, columns: torch.Tensor) -> None:
        self.segment = segment
        self.columns = columns  # (d, k)

    @property
    def num_scalars(self) -> int:
        return self.columns.shape[1]

    @property
    def rank(self) -> int:
        return self.columns.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.columns]

    def set_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        (self.columns,) = tensors

    def project(self, seg: torch.Tensor) -> torch.Tensor:
        return self.columns.T @ seg  # (k,)

    def expand(self, coords: torch.Tensor) -> torch.Tensor:
        return self.columns @ coords  # (d,)

    def column(self, index: int) -> torch.Tensor:
        return self.columns[:, index]

    def oja(self, vector: torch.Tensor, alpha: float) -> None:
        """U <- U + alpha v_hat (v_hat^T U), v_hat = v/||v||, re-orthonormalised exactly in O(d k).

        With b = U^T v_hat: U'^T U' = I + (2 alpha + alpha^2) b b^T, whose inverse square root
        is a rank-one correction; the result spans the same subspace as QR of the raw step.
        """
        norm = vector.norm()
        if not torch.isfinite(norm) or norm == 0 or self.rank == 0:
            return
        unit = vector / norm
        coords = self.columns.T @ unit  # b (k,)
        coords_norm = coords.norm()
        if coords_norm > 0:
            growth = (2 * alpha + alpha * alpha) * coords_norm**2
            beta = torch.rsqrt(1 + growth) - 1
            coords_unit = coords / coords_norm
            column = (1 + beta) * alpha * coords_norm * unit + beta * (self.columns @ coords_unit)
            self.columns.add_(torch.outer(column, coords_unit))

    def track(self, estimate: torch.Tensor, step: float) -> None:
        """Oja step U + step * u (u^T U) with this segment's estimate u (see CodebookDirections)."""
        self.oja(estimate, step * float(estimate.dot(estimate)))

    def reorthonormalize(self) -> None:
        if self.rank:
            self.columns = orthonormalize(self.columns)


class FactorBlock:
    """Left L (m, k) and right R (n, k) bases of one matrix segment; scalars vec(L^T G R)."""

    kind = "factor"

    def __init__(self, segment: Segment, left: torch.Tensor, right: torch.Tensor) -> None:
        self.segment = segment
        self.left = left  # (m, k)
        self.right = right  # (n, k)

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def num_scalars(self) -> int:
        return self.rank * self.rank

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]

    def set_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        self.left, self.right = tensors

    def _matrix(self, seg: torch.Tensor) -> torch.Tensor:
        return seg.view(self.segment.rows, self.segment.cols)

    def project(self, seg: torch.Tensor) -> torch.Tensor:
        return (self.left.T @ self._matrix(seg) @ self.right).reshape(-1)  # (k*k,)

    def expand(self, coords: torch.Tensor) -> torch.Tensor:
        core = coords.view(self.rank, self.rank)
        return (self.left @ core @ self.right.T).reshape(-1)  # (m*n,)

    def column(self, index: int) -> torch.Tensor:
        i, j = divmod(index, self.rank)
        return torch.outer(self.left[:, i], self.right[:, j]).reshape(-1)

    def track(self, estimate: torch.Tensor, step: float) -> None:
        """Oja on both sides with the samples Y_L = G R and Y_R = G^T L of the estimate G:
        L <- orth(L + step Y_L (Y_L^T L)) = orth(L + step Y_L C^T), C = L^T G R, and
        R <- orth(R + step Y_R C) likewise. Only G R and G^T L outside span(L), span(R) rotate."""
        if self.rank == 0:
            return
        grad = self._matrix(estimate)
        core = self.left.T @ grad @ self.right  # C (k, k)
        left_samples = grad @ self.right  # (m, k)
        right_samples = grad.T @ self.left  # (n, k)
        self.left = orthonormalize(self.left + step * (left_samples @ core.T))
        self.right = orthonormalize(self.right + step * (right_samples @ core))

    def reorthonormalize(self) -> None:
        if self.rank:
            self.left, self.right = orthonormalize(self.left), orthonormalize(self.right)


Block = VectorBlock | FactorBlock


class Layout:
    """The blocks of all segments: U (D, r) in structured form."""

    def __init__(self, dim: int, rank: int, blocks: Sequence[Block]) -> None:
        used = sum(b.num_scalars for b in blocks)
        if used > rank:
            raise ValueError(f"the layout's blocks use {used} scalars, more than rank={rank}.")
        self.dim, self.rank, self.blocks = dim, rank, list(blocks)
        self.starts = []
        start = 0
        for block in self.blocks:
            self.starts.append(start)
            start += block.num_scalars
        self.used = start  # slots [used, rank) are idle

    @property
    def device(self) -> torch.device:
        return self.blocks[0].tensors()[0].device

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        """U^T g (r,); idle slots are 0."""
        parts = [b.project(b.segment.slice(grad)) for b in self.blocks if b.num_scalars]
        parts.append(torch.zeros(self.rank - self.used, dtype=grad.dtype, device=grad.device))
        return torch.cat(parts)

    def expand(self, coords: torch.Tensor) -> torch.Tensor:
        """U a (D,) from the r coordinates."""
        out = torch.zeros(self.dim, dtype=coords.dtype, device=coords.device)
        for block, start in zip(self.blocks, self.starts):
            if block.num_scalars:
                block.segment.slice(out).copy_(block.expand(coords[start : start + block.num_scalars]))
        return out

    def remove_span(self, vector: torch.Tensor) -> torch.Tensor:
        """P v = v - U U^T v."""
        return vector - self.expand(self.project(vector))

    def column(self, index: int) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        for block, start in zip(self.blocks, self.starts):
            if start <= index < start + block.num_scalars:
                block.segment.slice(out).copy_(block.column(index - start))
        return out

    def materialize(self) -> torch.Tensor:
        """U (D, r) as a dense matrix (for tests and small models: D r floats)."""
        if len(self.blocks) == 1 and self.blocks[0].kind == "vector" and self.used == self.rank:
            return self.blocks[0].columns  # the dense codebook: no copy
        return torch.stack([self.column(j) for j in range(self.rank)], dim=1)

    def track(self, estimate: torch.Tensor, step: float) -> None:
        for block in self.blocks:
            block.track(block.segment.slice(estimate), step)

    def reorthonormalize(self) -> None:
        for block in self.blocks:
            block.reorthonormalize()

    def to(self, device: torch.device | str) -> None:
        for block in self.blocks:
            block.set_tensors([t.to(device) for t in block.tensors()])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kinds": [b.kind for b in self.blocks],
            "tensors": [[t.detach().cpu().clone() for t in b.tensors()] for b in self.blocks],
        }

    @classmethod
    def from_state(cls, dim: int, rank: int, segments: Sequence[Segment], state: dict[str, Any],
                   device: torch.device | str) -> "Layout":
        """The layout saved by ``state_dict``, checked against this run's segments."""
        kinds, tensors = list(state["kinds"]), list(state["tensors"])
        if len(kinds) != len(segments) or len(tensors) != len(segments):
            raise ValueError(f"checkpoint codebook has {len(kinds)} blocks, this model has {len(segments)} "
                             "parameters. HINT: resume with the same model and param_shapes.")
        blocks: list[Block] = []
        for segment, kind, parts in zip(segments, kinds, tensors):
            parts = [t.to(device=device, dtype=torch.float32).clone() for t in parts]
            expected = (segment.size,) if kind == "vector" else (segment.rows, segment.cols)
            if tuple(p.shape[0] for p in parts) != expected:
                raise ValueError(f"checkpoint codebook block of kind {kind!r} has rows "
                                 f"{tuple(p.shape[0] for p in parts)}, this parameter needs {expected}. "
                                 "HINT: resume with the same model, structure and param_shapes.")
            blocks.append(VectorBlock(segment, *parts) if kind == "vector" else FactorBlock(segment, *parts))
        return cls(dim, rank, blocks)
