"""Float32 weights laid out in panels of 16 rows, the layout the compiled products read (backends/panel_kernels).

A weight w [N, K] is held as panels [N / 16, K, 16]: panel p is rows 16p .. 16p + 15 of w, transposed, so that
multiplying by it reads K lines of 64 bytes one after another, each line 16 weights of one value of K. On a
machine with AVX-512 the NumPy backend multiplies a large model's float32 weights this way at every step,
whatever the number of rows (backends/numpy.py's params_held_in_panels), so the weight store keeps the panels
*in place of* the [N, K] arrays (`WeightStore.panelise`): the weights are not held twice. Whatever needs w
itself (the reference backend, quantising, stacking for a pass) reads it through `dense()` or `np.asarray`, a
copy. A small model keeps its arrays, and its program copies them into panels once it batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MinitorchError

PANEL = 16          # rows of w in a panel: one 16-lane vector of float32 per value of K


@dataclass(frozen=True, eq=False)
class PanelledWeight:
    """A float32 weight [N, K] (N a multiple of 16) held as `panels` [N / 16, K, 16], C-contiguous."""

    panels: np.ndarray

    @classmethod
    def of(cls, w: np.ndarray) -> PanelledWeight:
        """w's panels (a copy, in the new layout)."""
        if not fits(w):
            raise MinitorchError(f"cannot lay out a {w.dtype}{list(w.shape)} weight in panels: it must be a float32 "
                                 f"matrix with a multiple of {PANEL} rows")
        rows, width = w.shape
        panels = np.empty((rows // PANEL, width, PANEL), np.float32)
        if w.flags.f_contiguous:           # wᵀ is row-major: its rows give each panel's lines
            np.copyto(panels, w.T.reshape(width, rows // PANEL, PANEL).transpose(1, 0, 2))
        else:
            np.copyto(panels, w.reshape(rows // PANEL, PANEL, width).transpose(0, 2, 1))
        return cls(panels)

    @classmethod
    def rewritten(cls, w: np.ndarray) -> PanelledWeight:
        """w's panels written over w's own memory, one panel at a time (panel p takes the 64·K bytes that rows
        16p .. 16p + 15 of a row-major w held), so that converting needs one panel's scratch, not a second
        weight: SmolLM2's 113 MB embedding table is converted without doubling. w must be C-contiguous, and
        nothing may read it as a matrix afterwards."""
        if not (fits(w) and w.flags.c_contiguous and w.flags.writeable):
            raise MinitorchError(f"cannot rewrite a {w.dtype}{list(w.shape)} weight in panels in place: it must be "
                                 f"a writeable row-major float32 matrix with a multiple of {PANEL} rows")
        rows, width = w.shape
        blocks = w.reshape(rows // PANEL, PANEL * width)
        for block in blocks:
            block[:] = block.reshape(PANEL, width).T.ravel()        # ravel copies the transposed block first
        return cls(blocks.reshape(rows // PANEL, width, PANEL))

    @property
    def shape(self) -> tuple[int, int]:
        count, width, _ = self.panels.shape
        return count * PANEL, width

    @property
    def dtype(self) -> np.dtype:
        return self.panels.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return self.panels.nbytes

    def dense(self) -> np.ndarray:
        """w [N, K] as an ordinary array (a copy)."""
        return self.panels.transpose(0, 2, 1).reshape(self.shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self.dense()
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def take_rows(self, part: slice) -> PanelledWeight:
        """Rows part.start .. part.stop - 1 of w, whole panels of them, as a view (a packed weight's parts)."""
        return PanelledWeight(self.panels[panels_of_rows(part)])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of w, [len(ids), K] (an embedding table's lookup): each a column of one panel."""
        return self.panels[ids // PANEL, :, ids % PANEL]

    def __repr__(self) -> str:
        return f"PanelledWeight(f32{list(self.shape)} in panels of {PANEL})"


def panels_of_rows(part: slice) -> slice:
    """The panels that hold rows part.start .. part.stop - 1 of a weight, which must be whole panels of them."""
    if part.start % PANEL or part.stop % PANEL:
        raise MinitorchError(f"rows {part.start}..{part.stop} of a weight in panels are not whole panels of {PANEL}")
    return slice(part.start // PANEL, part.stop // PANEL)


def fits(w) -> bool:
    """Whether a weight can be laid out in panels: a float32 matrix with a multiple of 16 rows."""
    return (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.ndim == 2 and w.shape[0] % PANEL == 0
            and w.shape[0] > 0)
