"""Draw a grid of synthetic_falls images, one row per activity, to see what the models see.

python scripts/preview_synthetic.py --out docs/synthetic_falls.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fallopt.data import synthetic_falls as sf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_falls.jpg"))
    parser.add_argument("--per-activity", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n = args.per_activity * len(sf.ACTIVITIES)
    x, _, activities = sf.generate(n, seed=args.seed, size=args.size)
    label_width = 120
    rows = []
    for a, name in enumerate(sf.ACTIVITIES):
        label = Image.new("RGB", (label_width, args.size), "white")
        kind = "fall" if name in sf.FALL_ACTIVITIES else "no fall"
        ImageDraw.Draw(label).text((6, args.size // 2 - 12), f"{name}\n({kind})", fill="black")
        rows.append(np.concatenate([np.asarray(label), *x[activities == a]], axis=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, quality=85)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
