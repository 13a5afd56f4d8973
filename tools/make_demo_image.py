#!/usr/bin/env python
"""Draw a small synthetic picture (a house and a tree) for demos: python tools/make_demo_image.py OUT.png"""

import sys

from PIL import Image, ImageDraw


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    img = Image.new("RGB", (640, 400), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 300, 640, 400], fill=(70, 150, 60))
    draw.rectangle([120, 180, 300, 320], fill=(200, 40, 40))
    draw.polygon([(100, 180), (210, 100), (320, 180)], fill=(120, 60, 30))
    draw.rectangle([450, 200, 480, 320], fill=(100, 70, 40))
    draw.ellipse([400, 110, 530, 230], fill=(30, 130, 50))
    img.save(argv[0])
    print(f"demo image written to {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
