"""Shapes world: a tiny procedural text-to-image domain to train and measure DreamBooth in.

``world`` generates captioned scenes and personalization subjects; ``analyzers`` reads images back
(background, object colour, position, size, shape, subject likeness) so results are scored exactly.
"""

from dreambooth.shapes.analyzers import (Analysis, analyze, background_color, is_subject, matches,
                                         object_color, object_position, object_size,
                                         pairwise_distance, shape_of, subject_features,
                                         subject_similarity)
from dreambooth.shapes.world import (COLORS, PALETTE, POSITIONS, SHAPES, SIZES, SUBJECTS, Scene,
                                     Subject, caption, held_out_combinations, make_dataset, new_subjects,
                                     parse_caption, render, render_subject, sample_scenes,
                                     write_subject_images)

__all__ = [
    "COLORS", "PALETTE", "POSITIONS", "SHAPES", "SIZES", "SUBJECTS", "Analysis", "Scene", "Subject",
    "analyze", "background_color", "caption", "held_out_combinations", "is_subject",
    "make_dataset", "matches", "new_subjects", "object_color", "object_position", "object_size",
    "pairwise_distance", "parse_caption", "render", "render_subject", "sample_scenes",
    "shape_of", "subject_features", "subject_similarity", "write_subject_images",
]
