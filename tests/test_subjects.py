"""Subject photos: bad input refused with a clear message, odd-but-valid input handled."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth.subjects import SubjectError, load_subject_images


def _save(path, image, **kw):
    image.save(path, **kw)
    return path


def _photo(size=(64, 48), color=(200, 30, 30), mode="RGB"):
    return Image.new(mode, size, color)


def test_sample_subject_loads(dog_dir):
    images = load_subject_images(str(dog_dir), 32)
    assert [img.name for img in images] == [f"0{i}.jpg" for i in range(5)]
    assert all(img.to_pil().mode == "RGB" for img in images)


def test_hidden_files_are_ignored(dog_dir):
    (dog_dir / ".DS_Store").write_bytes(b"junk")
    assert len(load_subject_images(str(dog_dir), 32)) == 5


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "is empty"),
    ],
)
def test_missing_or_empty_folder(tmp_path, make, message):
    with pytest.raises(SubjectError, match=message):
        load_subject_images(str(make(tmp_path)), 32)


def test_non_image_file_is_named(dog_dir):
    (dog_dir / "notes.txt").write_text("my dog")
    with pytest.raises(SubjectError, match=r"not images: notes\.txt"):
        load_subject_images(str(dog_dir), 32)


def test_a_scripted_subjects_definition_beside_the_photos_is_not_a_photo(tmp_path):
    """``scripts/make-shapes-subjects.py --new`` writes ``subject.json`` beside the photos for `eval`;
    the folder it prints is a valid ``--instance-dir`` (other JSON files are still refused)."""
    import subprocess
    import sys

    from dreambooth.subjects import SUBJECT_SPEC

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(repo / "scripts" / "make-shapes-subjects.py"), "--new", "1", "--seed", "5",
                    "--output", str(tmp_path)], check=True, capture_output=True)
    (folder,) = [f for f in tmp_path.iterdir() if f.is_dir()]
    assert (folder / SUBJECT_SPEC).is_file()
    assert len(load_subject_images(str(folder), 32)) == len(list(folder.glob("*.png")))
    (folder / "notes.json").write_text("{}")
    with pytest.raises(SubjectError, match=r"not images: notes\.json"):
        load_subject_images(str(folder), 32)


def test_a_txt_named_like_a_photo_is_its_caption(dog_dir):
    (dog_dir / "01.txt").write_bytes("\ufeffa {identifier} {class_noun}\n  on a red   sofa\n".encode("utf-8"))
    images = load_subject_images(str(dog_dir), 32)
    assert [img.caption for img in images] == [None, "a {identifier} {class_noun} on a red sofa", None, None, None]


def test_a_caption_shared_by_two_photos_of_one_name_is_refused(dog_dir):
    (dog_dir / "01.png").write_bytes(_png_bytes())
    assert len(load_subject_images(str(dog_dir), 32)) == 6  # no caption: the twins are two photos
    (dog_dir / "01.txt").write_text("a {identifier} {class_noun}")
    with pytest.raises(SubjectError, match=r"01\.jpg, 01\.png share a name, so their caption is ambiguous"):
        load_subject_images(str(dog_dir), 32)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _photo((64, 64)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "caption,message",
    [
        ("a dog on a sofa", r"01\.txt \('a dog on a sofa'\) does not name the subject: write \{identifier\}"),
        ("a {subject} on a sofa", r"may only use \{identifier\} and \{class_noun\}"),
        ("a {identifier:>999999} dog", "no format specs"),
        ("  \n", r"01\.txt is empty; write the photo's prompt in it"),
        (b"a {identifier} \xff dog", r"01\.txt is not UTF-8 text"),
        ("a {identifier} " + "dog " * 2000, r"01\.txt is 8,015 bytes; a caption is one prompt"),
    ],
)
def test_bad_captions_are_refused_before_training(dog_dir, caption, message):
    path = dog_dir / "01.txt"
    path.write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    with pytest.raises(SubjectError, match=message):
        load_subject_images(str(dog_dir), 32)


def test_corrupt_file_is_named(dog_dir):
    (dog_dir / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(SubjectError, match=r"bad\.jpg is corrupt or truncated"):
        load_subject_images(str(dog_dir), 32)


def test_truncated_file_is_named(dog_dir):
    data = (dog_dir / "00.jpg").read_bytes()
    (dog_dir / "00.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SubjectError, match=r"00\.jpg is corrupt or truncated"):
        load_subject_images(str(dog_dir), 32)


def test_too_many_images(tmp_path):
    for i in range(51):
        _save(tmp_path / f"{i:02d}.png", _photo())
    with pytest.raises(SubjectError, match="51 images.*at most 50"):
        load_subject_images(str(tmp_path), 32)


def test_image_smaller_than_resolution(dog_dir):
    with pytest.raises(SubjectError, match=r"128x128, smaller than --resolution 512"):
        load_subject_images(str(dog_dir), 512)


def test_exif_rotation_is_applied(tmp_path):
    image = _photo(size=(64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _save(tmp_path / "rotated.jpg", image, exif=exif.tobytes())
    (loaded,) = load_subject_images(str(tmp_path), 32)
    assert loaded.size == (40, 64)


@pytest.mark.parametrize(
    "name,image,expected_rgb",
    [
        ("rgba.png", Image.new("RGBA", (40, 40), (0, 0, 255, 0)), (255, 255, 255)),  # transparent → white
        ("gray.png", Image.new("L", (40, 40), 128), (128, 128, 128)),
        ("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), None),  # red in CMYK
        ("gray16.png", Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)), (255, 255, 255)),
        ("palette.gif", Image.new("P", (40, 40), 3), None),
    ],
)
def test_unusual_modes_become_rgb(tmp_path, name, image, expected_rgb):
    _save(tmp_path / name, image)
    (loaded,) = load_subject_images(str(tmp_path), 32)
    pixel = loaded.to_pil().getpixel((20, 20))
    assert loaded.to_pil().mode == "RGB"
    if expected_rgb is not None:
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, expected_rgb)), pixel
    if name == "cmyk.jpg":
        assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60, pixel


def test_fsspec_uri_is_read(dog_dir):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in sorted(dog_dir.iterdir())[:3]:
        fs.pipe(f"/subjects/dog/{path.name}", path.read_bytes())
    assert len(load_subject_images("memory://subjects/dog", 32)) == 3


def test_avif_photos_are_accepted_when_pillow_reads_them(tmp_path):
    from PIL import features

    assert features.check("avif"), "this Pillow has no AVIF support; the subject rules name the format instead"
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 100, 200)).save(tmp_path / f"{i}.avif")
    images = load_subject_images(str(tmp_path), 32)
    assert [img.name for img in images] == ["0.avif", "1.avif", "2.avif"] and images[0].size == (64, 48)


def test_photos_in_subfolders_are_named(dog_dir):
    (dog_dir / "set-a").mkdir()
    for photo in list(dog_dir.glob("*.jpg")):
        photo.rename(dog_dir / "set-a" / photo.name)
    with pytest.raises(SubjectError, match=r"subfolder\(s\) set-a/ \(5\).*--instance-dir at the subfolder"):
        load_subject_images(str(dog_dir), 32)
