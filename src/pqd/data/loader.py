"""The tensor-resident batch loader: uint8 batches to float32 in [0, 1], augmented on
the fly (random crop, flip, cutout) on the target device."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from pqd.errors import DataError

RESIZED_CROP_FROM = 64
"""Image side (pixels) from which ``crop="auto"`` means a random resized crop (below it:
a random crop after padding, as for CIFAR)."""


class Loader:
    """Tensor-resident batches: uint8 images live on ``device`` (on the CPU they may be views
    of a memory-mapped file); each batch is converted to float32 in [0, 1] and augmented on
    the fly on that device: ``crop="pad"`` takes a random crop after padding (CIFAR style),
    ``crop="resized"`` a random resized crop (a random area fraction in ``[min_scale, 1]``
    of the image, aspect ratio in [3/4, 4/3], scaled back to the full size, bilinear: the
    ImageNet-style crop), then a horizontal flip, then with ``cutout`` a square of that many
    pixels a side at a random centre (cut off at the border; DeVries & Taylor 2017) filled
    with the batch's mean colour. ``crop="auto"`` chooses ``resized`` for images of
    :data:`RESIZED_CROP_FROM` pixels or more. No workers, no PIL.

    All randomness (shuffle order, crop offsets, flips, cutout squares) comes from the
    Loader's own ``torch.Generator`` seeded with ``seed``; each ``iter()`` draws one epoch's
    worth up front,
    so the generator advances once per epoch, two Loaders with the same seed give identical
    batch sequences, and the global torch RNG is never touched.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        pad_mode: str = "reflect",
        flip: bool = True,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        crop: str = "pad",
        min_scale: float = 0.25,
        cutout: int = 0,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be [N={x.shape[0]}] labels, got {list(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        h, w = int(x.shape[2]), int(x.shape[3])
        if crop not in ("auto", "pad", "resized"):
            raise ValueError(f"crop must be 'auto', 'pad' or 'resized', got {crop!r}")
        if crop == "auto":
            crop = "resized" if min(h, w) >= RESIZED_CROP_FROM else "pad"
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if not 0 <= cutout <= min(h, w):
            raise DataError(
                f"cutout {cutout} does not fit {h}x{w} images",
                f"set data.augment.cutout between 0 (off) and {min(h, w)}",
            )
        if augment and crop == "pad" and pad_mode == "reflect" and crop_padding >= min(h, w):
            raise DataError(
                f"crop_padding {crop_padding} is too large for {h}x{w} images with reflect padding",
                f"set data.augment.crop_padding below {min(h, w)} or pad_mode: zeros",
            )
        self.device = torch.device(device)
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.crop = crop
        self.min_scale = float(min_scale)
        self.augment = augment and (crop == "resized" or crop_padding > 0 or flip or cutout > 0)
        self.cutout = int(cutout) if augment else 0
        self.crop_padding = int(crop_padding)
        self.pad_mode = pad_mode
        self.flip = flip
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.seed = int(seed)
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._ar_h = torch.arange(h, device=self.device)
        self._ar_w = torch.arange(w, device=self.device)

    @property
    def num_samples(self) -> int:
        """Number of images in the split."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def state_dict(self) -> dict[str, Any]:
        """Epochs drawn and the generator state: enough to continue the same batch sequence."""
        return {"epoch": self.epoch, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (a resumed run draws the same next epochs)."""
        self.epoch = int(state["epoch"])
        self._gen.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, p = self.num_samples, self.crop_padding
        # Draw the whole epoch's randomness now (CPU generator, then one copy to the device).
        order = torch.randperm(n, generator=self._gen) if self.shuffle else None
        offsets = flips = None
        if self.augment and self.crop == "resized":
            offsets = self._resized_boxes(n)
            flips = torch.rand(n, generator=self._gen) < 0.5 if self.flip else None
        elif self.augment:
            offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=self._gen)
            flips = torch.rand(n, generator=self._gen) < 0.5 if self.flip else None
        # drawn last, and only when asked: without cutout the stream is what it always was
        corners = self._cutout_corners(n) if self.cutout else None
        self.epoch += 1
        return self._batches(
            *(None if t is None else t.to(self.device) for t in (order, offsets, flips, corners))
        )

    def _cutout_corners(self, n: int) -> torch.Tensor:
        """``[n, 2]`` top-left corners (row, column) of each image's cutout square: its centre
        uniform over the image, so the square may hang over the border (then it is cut)."""
        h, w = int(self.x.shape[2]), int(self.x.shape[3])
        centres = torch.stack(
            [
                torch.randint(0, h, (n,), generator=self._gen),
                torch.randint(0, w, (n,), generator=self._gen),
            ],
            dim=1,
        )
        return centres - self.cutout // 2

    def _cut(self, out: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """``out`` with each image's cutout square (corner ``corners[k]``) filled with the
        batch's mean colour (a new tensor)."""
        s = self.cutout
        rows = (self._ar_h >= corners[:, 0:1]) & (self._ar_h < corners[:, 0:1] + s)  # [B, H]
        cols = (self._ar_w >= corners[:, 1:2]) & (self._ar_w < corners[:, 1:2] + s)  # [B, W]
        square = (rows[:, :, None] & cols[:, None, :])[:, None]  # [B, 1, H, W]
        fill = out.mean(dim=(0, 2, 3), keepdim=True)  # [1, C, 1, 1]
        return torch.where(square, fill, out)

    def _batches(
        self,
        order: torch.Tensor | None,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
        corners: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self.batch_size
        stop = n - n % b if self.drop_last else n
        for start in range(0, stop, b):
            end = min(start + b, n)
            if order is None:
                xb, yb = self.x[start:end], self.y[start:end]
            else:
                idx = order[start:end]
                xb, yb = self.x[idx], self.y[idx]
            if offsets is not None and self.crop == "resized":
                out = self._resized_crop(
                    xb, offsets[start:end], None if flips is None else flips[start:end]
                )
            elif offsets is not None:
                out = self._augment(
                    xb, offsets[start:end], None if flips is None else flips[start:end]
                )
            else:
                out = xb.to(torch.float32).div_(255.0)
            if corners is not None:
                out = self._cut(out, corners[start:end])
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb

    def _resized_boxes(self, n: int) -> torch.Tensor:
        """``[n, 4]`` crop boxes (width, height, center x, center y) in the [-1, 1] image
        coordinates of ``grid_sample``: area fraction uniform in [min_scale, 1], log aspect
        ratio uniform in [log 3/4, log 4/3], the box inside the image."""
        area = torch.empty(n).uniform_(self.min_scale, 1.0, generator=self._gen)
        log_r = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=self._gen)
        ratio = log_r.exp()
        bw = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the side
        bh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=self._gen) * 2 - 1) * (1 - bw)
        cy = (torch.rand(n, generator=self._gen) * 2 - 1) * (1 - bh)
        return torch.stack([bw, bh, cx, cy], dim=1)

    def _resized_crop(
        self, xb: torch.Tensor, box: torch.Tensor, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Each image's box (:meth:`_resized_boxes`) scaled to the full size (bilinear),
        mirrored where ``flips``: one batched ``affine_grid`` + ``grid_sample``."""
        bsz, c, h, w = xb.shape
        theta = torch.zeros(bsz, 2, 3, device=xb.device)
        sx = box[:, 0] if flips is None else torch.where(flips, -box[:, 0], box[:, 0])
        theta[:, 0, 0], theta[:, 0, 2] = sx, box[:, 2]
        theta[:, 1, 1], theta[:, 1, 2] = box[:, 1], box[:, 3]
        grid = torch.nn.functional.affine_grid(theta, [bsz, c, h, w], align_corners=False)
        src = xb.to(torch.float32).div_(255.0)
        return torch.nn.functional.grid_sample(
            src, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _augment(
        self, xb: torch.Tensor, off: torch.Tensor, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Random crop (pad ``crop_padding``, take an HxW window) + flip, as one gather.

        Output pixel (i, j) of image k reads padded pixel (oy_k + i, ox_k + j), i.e. original
        pixel (oy_k + i - p, ox_k + j - p) mapped back into the image by reflection (or
        zeroed, for ``pad_mode='zeros'``); flipping reverses the column indices.
        """
        bsz, c, h, w = xb.shape
        p = self.crop_padding
        rows = off[:, 0:1] - p + self._ar_h  # [B, H], original coordinates
        cols = off[:, 1:2] - p + self._ar_w  # [B, W]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        valid = None
        if self.pad_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
        elif p > 0:
            valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        lin = (rows[:, :, None] * w + cols[:, None, :]).view(bsz, 1, h * w).expand(bsz, c, h * w)
        out = torch.gather(xb.reshape(bsz, c, h * w), 2, lin)
        if valid is not None:
            out.masked_fill_(~valid.view(bsz, 1, h * w), 0)
        return out.view(bsz, c, h, w).to(torch.float32).div_(255.0)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-(n-1), 2n-2] into [0, n) by reflection without repeating the edge."""
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)
