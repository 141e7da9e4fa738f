"""Write the shipped shapes-world subjects (5 PNGs each, 32 px) into examples/subjects/<name>/.

    python scripts/make-shapes-subjects.py

Deterministic: tests/test_shapes_model.py checks the committed files equal what this writes.
"""

from pathlib import Path

from dreambooth.shapes import SUBJECTS, write_subject_images

ROOT = Path(__file__).resolve().parent.parent / "examples" / "subjects"
IMAGES, RESOLUTION, SEED = 5, 32, 0

if __name__ == "__main__":
    for subject in SUBJECTS.values():
        paths = write_subject_images(subject, ROOT / subject.name, n=IMAGES, resolution=RESOLUTION, seed=SEED)
        print(f"{subject.name}: {len(paths)} images in {paths[0].parent}")
