"""SpQR: 3-bit weights in small groups, 3-bit group statistics, and 16-bit outliers.

Dettmers, Svirschevski, Egiazarian, Kuznedelev, Frantar, Ashkboos, Borzunov,
Hoefler, Alistarh, "SpQR: A Sparse-Quantized Representation for Near-Lossless
LLM Weight Compression", 2023, https://arxiv.org/abs/2306.03078

Three ideas on top of GPTQ (``gptq.py``), which does the rounding:

* **Small groups.** Each row's weights are rounded in groups of ``group_size``
  (16) consecutive columns, each with its own min..max grid: a small group
  follows the weights closely.
* **Quantized statistics.** A group's scale and zero point would cost 2 x 16
  bits per 16 weights. Instead, the scales of a column group (one per row,
  a vector (O,)) are themselves rounded to ``stat_bits`` (3) bits in groups of
  ``stat_group`` (16) rows, each with an fp16 scale and offset; the zero points too.
* **Outliers.** A few weights would spoil their group's grid (an extreme value
  stretches it) or are too important to round. A weight's sensitivity is how
  much the group's error, weighted by the inverse-Hessian diagonal as GPTQ
  weights it, would fall if that weight were left out of the grid and kept
  exact. Weights whose sensitivity exceeds ``outlier_threshold`` times the
  layer's mean error per weight are kept in 16-bit in a sparse table (CSR).

The stored layer: codes (3 bits each), the statistics' codes (2 x 3 bits per
group) and their fp16 grids, and per outlier a 16-bit column index and a
16-bit correction (what to add to its dense value to give the weight back).
"""

from __future__ import annotations

import torch

from .gptq import GroupFit, Rounded
from .kernels import dequantize_groups, pack_codes, pack_int4, unpack_codes
from .quantize import QuantizedLinear, encode, minmax_grid


class StatisticsGrid:
    """A vector of statistics (O,) rounded to ``bits`` in groups of ``group`` entries (fp16 grids)."""

    def __init__(self, values: torch.Tensor, bits: int, group: int):
        self.size = values.numel()
        padded = torch.cat([values, values[-1:].expand(-self.size % group)])  # whole groups
        grouped = padded.view(-1, group)  # (ceil(O/group), group)
        self.step, self.start = minmax_grid(grouped, bits)  # (ceil(O/group),)
        self.codes = encode(grouped, self.step[:, None], self.start[:, None], bits).view(-1)

    def decoded(self) -> torch.Tensor:  # (O,)
        group = self.codes.numel() // self.step.numel()
        return (self.codes.view(-1, group) * self.step[:, None] + self.start[:, None]).view(-1)[: self.size]


def first_level_halves(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded statistics -> the groups' scale and offset (-zero * scale), rounded to fp16 as the
    grouped kernels read them (values returned in fp32)."""
    return scale.half().float(), (-zero * scale).half().float()


def grid_error(w, d, scale, offset, bits: int) -> torch.Tensor:
    """Each weight's squared rounding error on the grid, over its inverse-Hessian diagonal d. (..., G)"""
    rounded = encode(w, scale, offset, bits) * scale + offset
    return (w - rounded) ** 2 / d


def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int) -> torch.Tensor:
    """How much each weight's leaving the grid would lower its group's error. (O, G)

    w (O, G) a group of columns; d (G,) their inverse-Hessian diagonal. A
    group's error is sum_k (w_k - round(w_k))^2 / d_k on its min..max grid; a
    weight left out is kept exact and the grid spans only the others.
    """

    def error(w, low, high):  # w (..., G); low, high (..., 1) -> (..., G)
        return grid_error(w, d, ((high - low) / (2**bits - 1)).clamp(min=1e-8), low, bits)

    ordered, order = w.sort(dim=-1)  # (O, G)
    base = error(w, ordered[:, :1], ordered[:, -1:]).sum(-1, keepdim=True)  # (O, 1)
    columns = torch.arange(w.shape[1], device=w.device)
    low = torch.where(order[:, :1] == columns, ordered[:, 1:2], ordered[:, :1])  # (O, G): min without j
    high = torch.where(order[:, -1:] == columns, ordered[:, -2:-1], ordered[:, -1:])
    errors = error(w[:, None, :], low[..., None], high[..., None])  # (O, G left out, G)
    errors = errors * (1 - torch.eye(w.shape[1], device=w.device))  # the left-out weight is exact
    return base - errors.sum(-1)


class SpQRFit(GroupFit):
    """SpQR's rounding of one group: outliers picked, grid fitted to the rest, statistics quantized."""

    def __init__(self, w, d, bits: int, threshold: float, stat_bits: int, stat_group: int, chunk_rows=32_768):
        self.bits = bits
        gain = torch.cat(
            [leave_one_out_gain(w[i : i + chunk_rows], d, bits) for i in range(0, w.shape[0], chunk_rows)]
        )
        scale, offset = minmax_grid(w, bits)
        typical = grid_error(w, d, scale[:, None], offset[:, None], bits).mean()  # per weight, outliers in
        self.outliers = gain > threshold * typical  # (O, G)
        inf = torch.tensor(float("inf"), device=w.device)
        low = torch.where(self.outliers, inf, w).amin(-1)
        high = torch.where(self.outliers, -inf, w).amax(-1)
        low = torch.where(torch.isinf(low), w.amin(-1), low)  # a row of outliers only: any grid will do
        high = torch.where(torch.isinf(high), w.amax(-1), high)
        # a grid far from 0 would need a huge zero point: widen its step instead, so |zero| <= 64
        reach = torch.maximum(low.abs(), high.abs()) / 64
        first_scale = torch.maximum((high - low) / (2**bits - 1), reach).clamp(min=2**-14)
        self.scales = StatisticsGrid(first_scale, stat_bits, stat_group)
        self.zeros = StatisticsGrid(-low / first_scale, stat_bits, stat_group)
        self.scale, self.offset = first_level_halves(self.scales.decoded(), self.zeros.decoded())


class SpQRLinear(QuantizedLinear):
    """3- or 4-bit codes in groups of G, quantized statistics, and a sparse table of outliers.

    packed (O, I/G, G*bits/8) uint8 codes; scale_codes, zero_codes (I/G, O/S, 3S/8)
    uint8 and scale_grid, zero_grid (I/G, O/S, 2) fp16 [step, start] for the
    statistics in groups of S rows; outlier_ptr (O + 1,) int32, outlier_cols
    (nnz,) int16, outlier_values (nnz,) fp16 (CSR); ``perm`` the column order.
    The weight at (r, c) is code * scale + offset of its group, plus its
    correction if (r, c) is an outlier.

    Decoded once for the decode kernels (not saved): ``nibbles`` (O, I/G, G/2),
    the codes in int4's layout, and ``group_scale``, ``group_offset`` (O, I/G) fp16.
    """

    def __init__(self, rounded: Rounded, bits: int, group_size: int, stat_bits: int, stat_group: int):
        out_features, in_features = rounded.codes.shape
        super().__init__(in_features, out_features, rounded.perm)
        self.bits, self.group_size, self.stat_bits, self.stat_group = bits, group_size, stat_bits, stat_group
        self.weight_format = f"spqr{bits}"
        self.register_buffer("packed", pack_codes(rounded.codes.view(out_features, -1, group_size), bits))
        for name in ("scale", "zero"):
            grids = [getattr(fit, name + "s") for fit in rounded.fits]  # one per column group
            codes = torch.stack([g.codes for g in grids]).view(len(grids), -1, stat_group)  # (I/G, O/S, S)
            grid = torch.stack([torch.stack([g.step, g.start], -1) for g in grids])  # (I/G, O/S, 2)
            self.register_buffer(f"{name}_codes", pack_codes(codes, stat_bits))
            self.register_buffer(f"{name}_grid", grid.half())
        dense = dequantize_groups(self.packed, *self.first_level(), self.bits)  # (O, I)
        rows, cols = rounded.outliers.nonzero(as_tuple=True)  # row by row: CSR order
        ptr = torch.zeros(out_features + 1, dtype=torch.int64)
        ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        self.register_buffer("outlier_ptr", ptr.to(torch.int32))
        self.register_buffer("outlier_cols", cols.to(torch.int16))
        self.register_buffer("outlier_values", (rounded.exact - dense)[rows, cols].half())
        self.restore_derived()

    @classmethod
    def empty(cls, description: dict) -> SpQRLinear:
        """A layer of the described shape with zero tensors, to load a state dict into."""
        rows, cols, group = description["out"], description["in"], description["group_size"]
        layer = cls.__new__(cls)
        QuantizedLinear.__init__(layer, cols, rows, torch.arange(cols))
        layer.bits, layer.group_size, layer.stat_bits = description["bits"], group, description["stat_bits"]
        layer.weight_format = f"spqr{layer.bits}"
        layer.stat_group = description["stat_group"]
        layer.register_buffer(
            "packed", torch.zeros(rows, cols // group, group * layer.bits // 8, dtype=torch.uint8)
        )
        stat_bytes = layer.stat_group * layer.stat_bits // 8
        row_groups = -(-rows // layer.stat_group)
        for name in ("scale", "zero"):
            layer.register_buffer(
                f"{name}_codes", torch.zeros(cols // group, row_groups, stat_bytes, dtype=torch.uint8)
            )
            layer.register_buffer(
                f"{name}_grid", torch.zeros(cols // group, row_groups, 2, dtype=torch.float16)
            )
        nnz = description["outliers"]
        layer.register_buffer("outlier_ptr", torch.zeros(rows + 1, dtype=torch.int32))
        layer.register_buffer("outlier_cols", torch.zeros(nnz, dtype=torch.int16))
        layer.register_buffer("outlier_values", torch.zeros(nnz, dtype=torch.float16))
        layer.restore_derived()
        return layer

    def restore_derived(self) -> None:
        super().restore_derived()
        counts = self.outlier_ptr.diff()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)
        self.register_buffer("outlier_rows", rows.to(torch.int32), persistent=False)
        self.max_row_outliers = int(counts.max()) if counts.numel() else 0
        # the layout the decode kernels read: codes as nibbles (int4's), statistics in fp16
        nibbles = self.packed if self.bits == 4 else pack_int4(unpack_codes(self.packed, self.bits))
        self.register_buffer("nibbles", nibbles, persistent=False)
        scale, offset = self.first_level()
        self.register_buffer("group_scale", scale.half().contiguous(), persistent=False)
        self.register_buffer("group_offset", offset.half().contiguous(), persistent=False)

    def first_level(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The groups' scale and offset (O, I/G), decoded from their 3-bit codes.

        fp32 values, rounded to fp16 (``first_level_halves``).
        """

        def decode(name):
            codes, grid = getattr(self, f"{name}_codes"), getattr(self, f"{name}_grid")
            values = dequantize_groups(codes, grid[..., 0], grid[..., 1], self.stat_bits)  # (I/G, O/S*S)
            return values[:, : self.out_features].T  # (O, I/G)

        return first_level_halves(decode("scale"), decode("zero"))

    def stored(self):
        return (
            self.nibbles,
            self.group_scale,
            self.group_offset,
            self.outlier_ptr,
            self.outlier_rows,
            self.outlier_cols,
            self.outlier_values,
        )

    def stored_weight(self, rows=None):
        if rows is None:
            weight = dequantize_groups(self.nibbles, self.group_scale, self.group_offset, 4)
            rows_all = self.outlier_rows.long()
            return weight.index_put_(
                (rows_all, self.outlier_cols.long()), self.outlier_values.float(), accumulate=True
            )
        flat = rows.reshape(-1)
        weight = dequantize_groups(self.nibbles[flat], self.group_scale[flat], self.group_offset[flat], 4)
        if self.max_row_outliers:  # each row's outliers: at most max_row_outliers, read from the CSR
            start = self.outlier_ptr[flat].long()
            count = self.outlier_ptr[flat + 1].long() - start
            slots = torch.arange(self.max_row_outliers, device=flat.device)
            index = (start[:, None] + slots).clamp(max=self.outlier_values.numel() - 1)  # (n, K)
            values = torch.where(slots < count[:, None], self.outlier_values[index].float(), 0.0)
            weight = weight.scatter_add(1, self.outlier_cols[index].long(), values)
        return weight.view(*rows.shape, self.in_features)

    def description(self):
        return {
            **super().description(),
            "bits": self.bits,
            "group_size": self.group_size,
            "stat_bits": self.stat_bits,
            "stat_group": self.stat_group,
            "outliers": self.outlier_values.numel(),
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, outliers={self.outlier_values.numel()}"
