"""Subject photos: find, read and check them before any cluster time is spent.

Owns the bad-input rules for instance images. Handled silently (the right answer): EXIF rotation,
RGBA/LA/P with transparency (composited on white), grayscale, CMYK, 16-bit. Refused with a message
saying what to fix: a missing or empty folder, too few or too many images, files that are not
images, corrupt or truncated files, images smaller than the training resolution.

The result is a list of ``SubjectImage`` (name + RGB PNG bytes), small enough to ship to every
training worker inside the train-loop config.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth import storage
from dreambooth.config import MAX_INSTANCE_IMAGES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SubjectError(ValueError):
    """A subject's photos cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class SubjectImage:
    name: str
    png: bytes  # RGB, upright, at the original size
    size: tuple[int, int]  # (width, height)

    def to_pil(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → upright 8-bit RGB (EXIF orientation applied, transparency on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray((arr / top * 255).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def _decode(name: str, data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # catches many corrupt files cheaply
        image = Image.open(io.BytesIO(data))
        image.load()  # catches truncated files: verify() does not decode pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SubjectError(f"{name} is corrupt or truncated ({exc}); re-export or remove it") from None
    return image


def load_subject_images(instance_dir: str, resolution: int) -> list[SubjectImage]:
    """Read and check every photo in ``instance_dir`` (local path or fsspec URI)."""
    fs, root = storage.filesystem(instance_dir)
    if not fs.exists(root) or not fs.isdir(root):
        raise SubjectError(f"--instance-dir {instance_dir} does not exist or is not a folder")
    files = sorted(p for p in fs.ls(root, detail=False) if not p.rsplit("/", 1)[-1].startswith("."))
    files = [p for p in files if fs.isfile(p)]
    if not files:
        raise SubjectError(f"--instance-dir {instance_dir} is empty; put 3-5 photos of your subject in it")
    not_images = [p.rsplit("/", 1)[-1] for p in files if not p.lower().endswith(IMAGE_SUFFIXES)]
    if not_images:
        raise SubjectError(
            f"--instance-dir {instance_dir} holds files that are not images: {', '.join(not_images[:5])}"
            f"{' ...' if len(not_images) > 5 else ''}; move them out (accepted: {', '.join(IMAGE_SUFFIXES)})"
        )
    if len(files) > MAX_INSTANCE_IMAGES:
        raise SubjectError(
            f"--instance-dir {instance_dir} has {len(files)} images; DreamBooth needs 3-5 and accepts at most "
            f"{MAX_INSTANCE_IMAGES}: pick the best few"
        )
    images = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        image = to_rgb(_decode(f"{instance_dir.rstrip('/')}/{name}", fs.cat_file(path)))
        if min(image.size) < resolution:
            raise SubjectError(
                f"{name} is {image.size[0]}x{image.size[1]}, smaller than --resolution {resolution} on its short "
                f"side; use larger photos or a lower --resolution"
            )
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(SubjectImage(name=name, png=buf.getvalue(), size=image.size))
    return images
