"""The only place that reshapes for granularity.

A granularity is a tile ``(tr, tc)`` over a ``(rows, cols)`` matrix (see ``spec.tile_of``).
When the tile does not divide the matrix, the matrix splits into at most four rectangular
regions (the even interior, the right edge, the bottom edge, the corner); inside each region
every tile has the same size, so the region is a clean ``(n_blocks, block_size)`` view.

Scales live on the *scale grid* ``(ceil(rows/tr), ceil(cols/tc))``; region ``r`` owns the
sub-rectangle ``r.grid`` of it, in row-major tile order.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import torch
from torch import Tensor


@dataclass(frozen=True)
class Region:
    rows: slice  # matrix rows covered
    cols: slice  # matrix columns covered
    tile: tuple[int, int]  # (tr, tc) of every tile in this region
    grid: tuple[slice, slice]  # the part of the scale grid this region owns

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.grid[0].stop - self.grid[0].start, self.grid[1].stop - self.grid[1].start)


def grid_shape(shape: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    return ceil(shape[0] / tile[0]), ceil(shape[1] / tile[1])


def regions(shape: tuple[int, int], tile: tuple[int, int]) -> list[Region]:
    """Split a (rows, cols) matrix into evenly tiled regions (1 to 4)."""
    rows, cols = shape
    tr, tc = min(tile[0], rows), min(tile[1], cols)
    r_full, c_full = (rows // tr) * tr, (cols // tc) * tc
    out = []
    for r0, r1, rt in ((0, r_full, tr), (r_full, rows, rows - r_full)):
        for c0, c1, ct in ((0, c_full, tc), (c_full, cols, cols - c_full)):
            if r1 > r0 and c1 > c0:
                g = (slice(r0 // tr, r0 // tr + (r1 - r0) // rt), slice(c0 // tc, c0 // tc + (c1 - c0) // ct))
                out.append(Region(slice(r0, r1), slice(c0, c1), (rt, ct), g))
    return out


def to_blocks(x: Tensor, region: Region) -> Tensor:
    """(rows, cols) matrix -> (n_blocks, tr*tc) blocks of one region, row-major over tiles."""
    sub = x[region.rows, region.cols]
    gr, gc = region.grid_shape
    tr, tc = region.tile
    return sub.reshape(gr, tr, gc, tc).permute(0, 2, 1, 3).reshape(gr * gc, tr * tc)  # (gr*gc, tr*tc)


def from_blocks(blocks: Tensor, region: Region, out: Tensor) -> None:
    """Write one region's (n_blocks, tr*tc) blocks back into the matrix ``out`` in place."""
    gr, gc = region.grid_shape
    tr, tc = region.tile
    out[region.rows, region.cols] = blocks.reshape(gr, gc, tr, tc).permute(0, 2, 1, 3).reshape(gr * tr, gc * tc)


def grid_take(grid: Tensor, region: Region) -> Tensor:
    """The (n_blocks, 1) per-block values of ``region`` from a scale grid."""
    return grid[region.grid].reshape(-1, 1)


def grid_put(grid: Tensor, region: Region, values: Tensor) -> None:
    """Store (n_blocks, 1) per-block values of ``region`` into a scale grid in place."""
    grid[region.grid] = values.reshape(region.grid_shape).to(grid.dtype)


def empty_grid(shape: tuple[int, int], tile: tuple[int, int]) -> Tensor:
    return torch.zeros(grid_shape(shape, tile), dtype=torch.float32)
