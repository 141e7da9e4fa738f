"""Labelled grids: a prompt strip over every row, column-group headers, small images enlarged."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dreambooth.sample import GAP_PX, LABEL_PX, MIN_CELL_PX, labelled_grid


def _images(rows: int, cols: int, size: int, seed: int) -> list[list[Image.Image]]:
    rng = np.random.default_rng(seed)
    return [[Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(cols)]
            for _ in range(rows)]


def _ink(strip: Image.Image) -> int:
    """Dark pixels in a label strip (text is drawn in black on white)."""
    return int((np.asarray(strip.convert("L")) < 128).sum())


def test_before_after_grid_has_headers_prompt_rows_and_enlarged_cells():
    prompts = ["a sks triangle on a green background", "a sks triangle", "a triangle"]
    before, after = _images(3, 2, 32, 0), _images(3, 2, 32, 1)
    grid, layout = labelled_grid(prompts, [("base", before), ("personalized", after)])
    scale = MIN_CELL_PX // 32
    assert layout.cell == (32 * scale, 32 * scale)
    assert grid.size == (2 * 2 * 32 * scale + GAP_PX, LABEL_PX + 3 * (LABEL_PX + 32 * scale))
    for group, rows in enumerate((before, after)):  # every cell is its image, enlarged by nearest neighbour
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                cell = grid.crop(layout.cell_box(r, c, group))
                assert np.array_equal(np.asarray(cell), np.asarray(image.resize(layout.cell, Image.NEAREST)))
    width = grid.width
    header_left = grid.crop((0, 0, width // 2, LABEL_PX))
    header_right = grid.crop((width // 2, 0, width, LABEL_PX))
    assert _ink(header_left) > 20 and _ink(header_right) > _ink(header_left)  # "personalized" is longer than "base"
    strips = [grid.crop((0, layout.cell_box(r, 0)[1] - LABEL_PX, width, layout.cell_box(r, 0)[1])) for r in range(3)]
    inks = [_ink(strip) for strip in strips]
    assert all(ink > 20 for ink in inks) and inks[0] > inks[1] > inks[2]  # longer prompts, more text
    assert not np.array_equal(np.asarray(strips[1]), np.asarray(strips[2]))


def test_large_images_are_not_enlarged_and_one_group_has_no_header():
    grid, layout = labelled_grid(["a dog"], [("", _images(1, 3, 256, 2))])
    assert layout.cell == (256, 256) and not layout.headers
    assert grid.size == (3 * 256, LABEL_PX + 256)


def test_a_prompt_too_long_for_the_row_is_cut_with_an_ellipsis():
    long = "a sks dog " + "in a very long scene description " * 10
    grid, layout = labelled_grid([long], [("", _images(1, 1, 32, 3))])
    strip = np.asarray(grid.crop((0, 0, grid.width, LABEL_PX)).convert("L"))
    assert (strip[:, -2:] > 200).all()  # the text stops before the edge
