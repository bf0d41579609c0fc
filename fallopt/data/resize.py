"""Images held as arrays (pickles, CIFAR batches) brought to `dataset.image_size` and `channels`.

Files decoded by `fallopt.data.images` are shaped as they are decoded; this is the same for
sources that arrive as arrays, with the same Pillow filters.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from fallopt.data.dataset import Split
from fallopt.data.images import RESIZE_FILTERS, convert_mode


def conform(
    split: Split, size: list[int] | None, channels: int | None, resize_filter: str
) -> tuple[Split, str | None]:
    """`split` with images of `size` (height, width) and `channels`; a note of what changed.

    Converted and resized as decoded files are (`fallopt.data.images`): three channels
    become one by Pillow's luma (ITU-R 601-2), one becomes three by copying.
    """
    n, h, w, c = split.x.shape
    target = (h, w) if size is None else (size[0], size[1])
    channels = channels or c
    if (h, w) == target and c == channels:
        return split, None
    out = np.empty((n, *target, channels), np.uint8)

    def one(i: int) -> None:  # Pillow releases the GIL while it converts and resizes
        image, _ = convert_mode(
            Image.fromarray(split.x[i, ..., 0] if c == 1 else split.x[i]), channels
        )
        if (h, w) != target:
            image = image.resize((target[1], target[0]), RESIZE_FILTERS[resize_filter])
        out[i] = np.asarray(image).reshape(*target, channels)

    with ThreadPoolExecutor() as pool:
        list(pool.map(one, range(n)))
    what = []
    if (h, w) != target:
        what.append(f"resized {h}x{w} to {target[0]}x{target[1]} ({resize_filter})")
    if c != channels:
        what.append(f"{c} channels converted to {channels}")
    return Split(out, split.y, split.groups), f"{n} images {' and '.join(what)}"
