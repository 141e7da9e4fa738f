"""Write shapes-world subjects (5 PNGs each, 32 px): the shipped ones, or new ones for checking a recipe.

    python scripts/make-shapes-subjects.py                              # the shipped subjects → examples/subjects/<name>/
                                                                        # (captioned, as the shapes recipe trains them)
    python scripts/make-shapes-subjects.py --new 4 --seed 7 --output /tmp/new-subjects
                                                                        # 4 subjects unlike the shipped ones, each with a
                                                                        # subject.json that `dreambooth eval` reads
    ... --captions                                                      # and a caption beside each photo (its place
                                                                        # and background), which `run` trains on
    ... --photo-backgrounds 2                                           # every subject's photos on 2 of its backgrounds,
                                                                        # so most of eval's background asks are new

Deterministic: tests/test_shapes_model.py checks the committed files equal what the first form writes.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from dreambooth.shapes import SIZES, SUBJECTS, new_subjects, write_subject_images
from dreambooth.shapes.world import article
from dreambooth.subjects import SUBJECT_SPEC

ROOT = Path(__file__).resolve().parent.parent / "examples" / "subjects"
IMAGES, RESOLUTION, SEED = 5, 32, 0

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=0, help="write this many new subjects instead of the shipped ones")
    parser.add_argument("--seed", type=int, default=SEED, help="which new subjects, and their photos")
    parser.add_argument("--output", type=Path, default=ROOT, help="parent folder of the subject folders")
    parser.add_argument("--captions", action="store_true",
                        help="also a caption beside each new subject's photo (its place and background), which "
                             "`run` trains on (the shapes recipe: beside the bare prompt); the shipped subjects "
                             "always have them")
    parser.add_argument("--photo-backgrounds", type=int,
                        help="photograph each new subject on only this many of its backgrounds "
                             "(default: one per photo)")
    args = parser.parse_args()
    if args.photo_backgrounds is not None and not args.new:
        parser.error("--photo-backgrounds applies to new subjects (--new N); the shipped ones keep their photos")
    if args.new:
        for subject in new_subjects(args.new, args.seed):
            folder = args.output / subject.name
            try:  # checked before any file is written
                paths = write_subject_images(subject, folder, n=IMAGES, resolution=RESOLUTION, seed=args.seed,
                                             sizes=tuple(SIZES), captions=args.captions,
                                             photo_backgrounds=args.photo_backgrounds)
            except ValueError as error:
                parser.error(f"--photo-backgrounds: {error}")
            (folder / SUBJECT_SPEC).write_text(json.dumps(asdict(subject), indent=1) + "\n")
            print(f"{subject.name}: {article(subject.color)} {subject.color} {subject.class_noun} with "
                  f"{subject.secondary} {subject.pattern.replace('_', ' ')}, {len(paths)} images in {folder}\n"
                  f"  dreambooth run --model shapes --instance-dir {folder} --class-noun {subject.class_noun} "
                  f"--output runs/{subject.name}")
    else:
        for subject in SUBJECTS.values():
            # Always captioned: the shapes recipe trains each photo on its caption and on the bare prompt.
            paths = write_subject_images(subject, args.output / subject.name, n=IMAGES, resolution=RESOLUTION, seed=SEED,
                                         captions=True)
            print(f"{subject.name}: {len(paths)} images in {paths[0].parent}")
