"""Subject photos: find, read and check them before any cluster time is spent.

Owns the bad-input rules for instance images. Handled silently (the right answer): EXIF rotation,
RGBA/LA/P with transparency (composited on white), grayscale, CMYK, 16-bit. Refused with a message
saying what to fix: a missing or empty folder, too few or too many images, files that are not
images, corrupt or truncated files, images smaller than the training resolution.

A photo may carry its own training prompt: a ``.txt`` file named like it (``dog_01.txt`` beside
``dog_01.jpg``), one line with ``{identifier}`` where the subject is named and ``{class_noun}``
optional, e.g. ``a {identifier} {class_noun} on a red sofa``. Captions that say what else the photo
shows (background, place, pose) keep those things out of what the identifier means, so "a [V] dog
on the beach" can change them. Photos without one train on ``--instance-prompt`` ("a [V] [class]").
With ``--bare-prompt-with-captions`` a captioned photo trains on its caption and on the bare
instance prompt, half the time each (``training_examples``).

The result is a list of ``SubjectImage`` (name + RGB PNG bytes), small enough to ship to every
training worker inside the train-loop config.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from dreambooth import storage
from dreambooth.config import MAX_INSTANCE_IMAGES, ConfigError, validate_prompt_template
from dreambooth.inputs import MAX_PROMPT_CHARS
from dreambooth.training.backgrounds import PLAIN_BORDER_SHARE, unswappable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif")
HEIF_SUFFIXES = (".heic", ".heif")

MAX_IMAGE_BYTES = 64 << 20
"""Largest photo file read (64 MiB; a 50-megapixel JPEG is ~25 MiB)."""

MAX_IMAGE_PIXELS = 100_000_000
"""Largest photo accepted, in pixels (10000 x 10000), checked from the header before decoding."""

CAPTION_SUFFIX = ".txt"
SUBJECT_SPEC = "subject.json"
"""A scripted shapes subject's definition beside its photos (``scripts/make-shapes-subjects.py --new``):
``dreambooth eval`` reads it, training leaves it alone."""
MAX_CAPTION_BYTES = 4096
"""Largest caption file read (a prompt is at most ``MAX_PROMPT_CHARS``)."""


class SubjectError(ValueError):
    """A subject's photos cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class SubjectImage:
    name: str
    png: bytes  # RGB, upright, at the original size
    size: tuple[int, int]  # (width, height)
    caption: Optional[str] = None  # the photo's own prompt template (``{identifier}``, ``{class_noun}``)

    def to_pil(self) -> Image.Image:
        return Image.open(io.BytesIO(self.png)).convert("RGB")


def instance_prompts(images: list[SubjectImage], instance_prompt: str, identifier: str, class_noun: str) -> list[str]:
    """The training prompt of each photo: its caption filled in, else ``instance_prompt``."""
    return [instance_prompt if image.caption is None
            else image.caption.format(identifier=identifier, class_noun=class_noun) for image in images]


def training_examples(images: list[SubjectImage], instance_prompt: str, identifier: str, class_noun: str, *,
                      bare_prompt_with_captions: bool = False) -> tuple[list[SubjectImage], list[str]]:
    """The (photo, prompt) pairs training draws from, uniformly: each photo on ``instance_prompts``'
    prompt. With ``bare_prompt_with_captions`` (and at least one caption) every photo is listed twice,
    a captioned one on its caption and on the bare ``instance_prompt``, the others on the bare prompt
    both times: each photo is still drawn equally often, and a captioned one on either prompt half the
    time — the bare prompt stays the identifier's anchor while the captions tie the subject to the
    places and backgrounds they name."""
    prompts = instance_prompts(images, instance_prompt, identifier, class_noun)
    if not bare_prompt_with_captions or all(image.caption is None for image in images):
        return list(images), prompts
    return list(images) * 2, prompts + [instance_prompt] * len(images)


def check_backdrops_swappable(images: list[SubjectImage]) -> None:
    """``--background-swap`` repaints plain backdrops only: a SubjectError naming every other photo."""
    bad = unswappable([(image.name, image.to_pil()) for image in images])
    if bad:
        raise SubjectError(
            f"--background-swap repaints a plain backdrop, and {len(bad)} photo(s) are not on one: {', '.join(bad)} "
            f"(a plain backdrop needs {PLAIN_BORDER_SHARE:.0%} or more); photograph the subject on a plain "
            "backdrop, or set --background-swap 0")


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _read_caption(fs, path: str, shown: str, size: Optional[int]) -> str:
    """One caption file → its template, checked: one line, names the subject, only known fields."""
    if size is not None and size > MAX_CAPTION_BYTES:
        raise SubjectError(f"{shown} is {size:,} bytes; a caption is one prompt of at most "
                           f"{MAX_PROMPT_CHARS:,} characters: shorten it")
    with storage.guard(shown):
        data = fs.cat_file(path)
    try:
        text = " ".join(data.decode("utf-8-sig").split())
    except UnicodeDecodeError:
        raise SubjectError(f"{shown} is not UTF-8 text; save the caption as UTF-8") from None
    example = "e.g. 'a {identifier} {class_noun} on a red sofa'"
    if not text:
        raise SubjectError(f"{shown} is empty; write the photo's prompt in it ({example}) or delete it")
    try:
        validate_prompt_template(text, flag=f"caption {shown}")
    except ConfigError as exc:
        raise SubjectError(str(exc)) from None
    if "{identifier}" not in text:
        raise SubjectError(f"{shown} ({text!r}) does not name the subject: write {{identifier}} where it is "
                           f"named, {example}")
    return text


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


def _register_optional_plugins() -> bool:
    """HEIC/HEIF need the pillow-heif plugin; use it when it is installed. Returns whether it is."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _reason(exc: Exception) -> str:
    """PIL's message without the ``<_io.BytesIO object at 0x...>`` it names the file by."""
    if isinstance(exc, UnidentifiedImageError):
        return "its data is not in any image format Pillow can read"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip(" :") or type(exc).__name__


def _decode(name: str, data: bytes) -> Image.Image:
    suffix = name[name.rfind("."):].lower() if "." in name else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise SubjectError(
                        f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than the "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit; downscale it (the model trains at a few hundred pixels)"
                    )
                probe.verify()  # catches many corrupt files cheaply
            image = Image.open(io.BytesIO(data))
            image.load()  # catches truncated files: verify() does not decode pixels
    except SubjectError:
        raise
    except Image.DecompressionBombError:
        raise SubjectError(f"{name} declares more pixels than the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel limit "
                           "(a decompression bomb, or a huge photo); downscale or remove it") from None
    except UnidentifiedImageError as exc:
        if suffix in HEIF_SUFFIXES and not _register_optional_plugins():
            raise SubjectError(f"{name} is HEIC/HEIF, which needs the pillow-heif plugin: `pip install pillow-heif`, "
                               "or convert it to JPEG or PNG") from None
        if suffix == ".avif" and not features.check("avif"):
            raise SubjectError(f"{name} is AVIF, which this Pillow cannot read (built without AVIF); "
                               "upgrade Pillow or convert it to JPEG or PNG") from None
        raise SubjectError(f"{name} is corrupt or truncated ({_reason(exc)}); re-export or remove it") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SubjectError(f"{name} is corrupt or truncated ({_reason(exc)}); re-export or remove it") from None
    return image


def _listing(fs, root: str) -> tuple[list[dict], list[str]]:
    """(visible files with their sizes, visible subfolders) of one folder."""
    entries = [e for e in fs.ls(root, detail=True) if not e["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")]
    files = sorted((e for e in entries if e.get("type") == "file"), key=lambda e: e["name"])
    folders = sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory")
    return files, folders


def _photos_in_subfolders(fs, folders: list[str], instance_dir: str) -> str:
    """A hint naming subfolders that hold photos, for a folder without any at its top level."""
    found = []
    for folder in folders[:20]:
        files, _ = _listing(fs, folder)
        count = sum(e["name"].lower().endswith(IMAGE_SUFFIXES) for e in files)
        if count:
            found.append(f"{folder.rsplit('/', 1)[-1]}/ ({count})")
    if not found:
        return ""
    first = storage.join(instance_dir, found[0].split("/", 1)[0])
    return (f"; its photos are in subfolder(s) {', '.join(found)}: move them up into {instance_dir} "
            f"or point --instance-dir at the subfolder, e.g. {first}")


def load_subject_images(instance_dir: str, resolution: int) -> list[SubjectImage]:
    """Read and check every photo in ``instance_dir`` (local path or fsspec URI)."""
    fs, root = storage.filesystem(instance_dir)
    with storage.guard(instance_dir, "read"):
        is_folder = fs.exists(root) and fs.isdir(root)
        entries, folders = _listing(fs, root) if is_folder else ([], [])
        hint = _photos_in_subfolders(fs, folders, instance_dir) if is_folder and folders and not entries else ""
    if not is_folder:
        raise SubjectError(f"--instance-dir {instance_dir} does not exist or is not a folder")
    if not entries and not folders:
        raise SubjectError(f"--instance-dir {instance_dir} is empty; put 3-5 photos of your subject in it")
    if not entries:
        hint = hint or (f" (only subfolders: {', '.join(f.rsplit('/', 1)[-1] + '/' for f in folders[:5])}); "
                        "put 3-5 photos of your subject in it")
        raise SubjectError(f"--instance-dir {instance_dir} has no photos at its top level{hint}")
    sizes = {e["name"]: e.get("size") for e in entries}
    files = [e["name"] for e in entries if e["name"].lower().endswith(IMAGE_SUFFIXES)]
    photo_stems = {_stem(p) for p in files}
    captions = {_stem(e["name"]): e["name"] for e in entries
                if e["name"].lower().endswith(CAPTION_SUFFIX) and _stem(e["name"]) in photo_stems}
    not_images = [e["name"].rsplit("/", 1)[-1] for e in entries
                  if e["name"] not in files and e["name"] not in captions.values()
                  and e["name"].rsplit("/", 1)[-1] != SUBJECT_SPEC]
    if not_images:
        raise SubjectError(
            f"--instance-dir {instance_dir} holds files that are not images: {', '.join(not_images[:5])}"
            f"{' ...' if len(not_images) > 5 else ''}; move them out (accepted: {', '.join(IMAGE_SUFFIXES)}, and "
            f"a photo's caption named like it: dog_01{CAPTION_SUFFIX} beside dog_01.jpg, and a {SUBJECT_SPEC})"
        )
    if len(set(map(_stem, files))) < len(files):
        twins = sorted(p.rsplit("/", 1)[-1] for p in files if [_stem(f) for f in files].count(_stem(p)) > 1)
        if any(_stem(t) in captions for t in twins):
            raise SubjectError(f"--instance-dir {instance_dir}: {', '.join(twins[:4])} share a name, so their "
                               f"caption is ambiguous; rename one of them")
    if len(files) > MAX_INSTANCE_IMAGES:
        raise SubjectError(
            f"--instance-dir {instance_dir} has {len(files)} images; DreamBooth needs 3-5 and accepts at most "
            f"{MAX_INSTANCE_IMAGES}: pick the best few"
        )
    images = []
    for path in files:
        name = path.rsplit("/", 1)[-1]
        shown = f"{instance_dir.rstrip('/')}/{name}"
        size = sizes.get(path)
        if size is None:  # not every backend lists sizes
            with storage.guard(shown):
                size = fs.size(path)
        if size > MAX_IMAGE_BYTES:
            raise SubjectError(f"{shown} is {size:,} bytes, more than the {MAX_IMAGE_BYTES >> 20} MiB a photo may be; "
                               "re-export it smaller or remove it")
        with storage.guard(shown):
            data = fs.cat_file(path)
        image = to_rgb(_decode(shown, data))
        if min(image.size) < resolution:
            raise SubjectError(
                f"{name} is {image.size[0]}x{image.size[1]}, smaller than --resolution {resolution} on its short "
                f"side; use larger photos or a lower --resolution"
            )
        caption_path = captions.get(_stem(path))
        caption = None if caption_path is None else _read_caption(
            fs, caption_path, f"{instance_dir.rstrip('/')}/{caption_path.rsplit('/', 1)[-1]}", sizes.get(caption_path))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(SubjectImage(name=name, png=buf.getvalue(), size=image.size, caption=caption))
    return images
