import numpy as np
import pytest
import torch
from PIL import Image

from noisesearch.errors import NoiseSearchError
from noisesearch.figures import labelled_grid, save_labelled_grid


def _ink(pic: Image.Image, box) -> int:
    """Number of dark pixels in ``box`` (left, top, right, bottom)."""
    arr = np.asarray(pic.convert("L").crop(box))
    return int((arr < 128).sum())


def test_every_row_and_column_is_labelled_and_small_images_upscaled():
    images = torch.ones(6, 1, 8, 8)  # white images: any dark pixel comes from text
    rows = ["naive\n8 NFE", "beam\n8 NFE\njudge 0.50"]
    cols = ["0", "1", "2"]
    pic = labelled_grid(images, 2, rows, cols)
    bare = labelled_grid(images, 2, ["", ""], ["", "", ""])
    # upscaled: 8 px images take at least 64 px each
    assert pic.width >= 3 * 64 and pic.height >= 2 * 64
    # labels take room: the labelled grid is wider (row labels) and taller (column labels)
    assert pic.width > bare.width and pic.height > bare.height
    assert _ink(bare, (0, 0, bare.width, bare.height)) == 0
    label_w = pic.width - bare.width
    head_h = pic.height - bare.height
    cell_h = (pic.height - head_h) // 2
    for i in range(2):  # ink left of every row
        assert _ink(pic, (0, head_h + i * cell_h, label_w, head_h + (i + 1) * cell_h)) > 0
    cell_w = (pic.width - label_w) // 3
    for j in range(3):  # ink above every column
        assert _ink(pic, (label_w + j * cell_w, 0, label_w + (j + 1) * cell_w, head_h)) > 0


def test_images_are_placed_row_major():
    images = torch.ones(4, 3, 64, 64)
    white = labelled_grid(images, 2, ["a", "b"], ["x", "y"])
    images[1] = 0.0  # row 0, column 1 is black
    pic = labelled_grid(images, 2, ["a", "b"], ["x", "y"])
    diff = np.argwhere(np.asarray(white.convert("L")).astype(int) - np.asarray(pic.convert("L")) > 200)
    assert len(diff) == 64 * 64
    ys, xs = diff[:, 0], diff[:, 1]
    assert xs.min() > white.width // 2 and ys.max() < white.height * 0.6


def test_title_and_default_labels():
    images = torch.rand(3, 3, 16, 16)
    titled = labelled_grid(images, 1, title="five strategies at 360 NFEs")
    plain = labelled_grid(images, 1)
    assert titled.height > plain.height
    assert titled.width >= plain.width


def test_bad_input_is_one_line_error():
    images = torch.rand(4, 1, 8, 8)
    with pytest.raises(NoiseSearchError, match="row labels"):
        labelled_grid(images, 2, ["only one"], ["a", "b"])
    with pytest.raises(NoiseSearchError, match="column labels"):
        labelled_grid(images, 2, ["a", "b"], ["a"])
    with pytest.raises(NoiseSearchError, match="nrow"):
        labelled_grid(images, 5)
    with pytest.raises(NoiseSearchError, match=r"\[N, C, H, W\]"):
        labelled_grid(torch.rand(8, 8), 1)


def test_save_is_a_png(tmp_path):
    images = torch.rand(2, 3, 8, 8)
    path = save_labelled_grid(tmp_path / "sub" / "g.png", images, 1, ["row"], ["a", "b"], title="t")
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    with Image.open(path) as pic:
        assert pic.format == "PNG" and pic.width >= 128
