import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from toap_kit import plots


def test_hamming_histogram_splits_same_and_different_pairs():
    dist = np.array([[0, 1, 5], [2, 6, 7]])
    same = np.array([[True, True, False], [True, False, False]])
    fig = plots.hamming_histogram(dist, same, bits=8)
    bars = fig.axes[0].patches
    assert len(bars) == 2 * 9  # one bar per distance 0..8, for each of the two groups
    assert sum(b.get_height() for b in bars[:9]) == pytest.approx(1.0)  # normalised per group
    plt.close(fig)
    with pytest.raises(ValueError, match="same number"):
        plots.hamming_histogram(dist, same[:, :2])


def test_perturbation_figure_amplifies_and_checks_its_input():
    eps = 8 / 255
    delta = torch.full((3, 8, 8), eps)
    delta[:, :4] = -eps
    fig = plots.perturbation_figure(delta, eps, face=torch.full((3, 16, 16), 0.5))
    shown = fig.axes[1].images[0].get_array()
    assert shown.min() == pytest.approx(0.0) and shown.max() == pytest.approx(1.0)  # +-eps -> full range
    assert len(fig.axes) == 3
    plt.close(fig)
    fig = plots.perturbation_figure(delta, eps, title="toap-mid")
    assert fig._suptitle.get_text() == "toap-mid" and fig.axes[0].get_title().startswith("delta x")
    plt.close(fig)
    with pytest.raises(ValueError, match="3 x H x W"):
        plots.perturbation_figure(delta[0], eps)
    with pytest.raises(ValueError, match="eps"):
        plots.perturbation_figure(delta, 0.0)


def test_face_grid_lays_its_title_out_above_the_tiles():
    fig = plots.face_grid(torch.rand(3, 3, 8, 8), ["a", "b", "c"], ncols=2, title="three faces")
    assert fig._suptitle.get_text() == "three faces" and [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"]
    fig.canvas.draw()
    top_of_tiles = max(ax.title.get_window_extent().y1 for ax in fig.axes[:2])
    assert fig._suptitle.get_window_extent().y0 >= top_of_tiles, "the title overlaps the tiles' titles"
    plt.close(fig)
