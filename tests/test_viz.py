"""The colour-vs-orientation statistic of a filter bank (the paper's blob/interblob observation)."""

import torch

from edgehebb.viz import colour_orientation_summary, filter_stats


def _units() -> torch.Tensor:
    """(4, 3, 4, 4): a red-vs-cyan colour blob and a vertical grey edge, each alone and on a bright grey base."""
    blob = torch.zeros(3, 4, 4)
    blob[0, 1:3, 1:3], blob[1:, 1:3, 1:3] = 1.0, -0.5
    edge = torch.zeros(3, 4, 4)
    edge[:, :, :2], edge[:, :, 2:] = 1.0, -1.0
    base = torch.full((3, 4, 4), 3.0)   # a plain-norm filter's large component along the flat patch
    return torch.stack([blob, edge, base + blob, base + edge])


def test_flat_component_changes_neither_colour_nor_orientation():
    s = filter_stats(_units())
    assert s["colour"][0] > 0.9 and s["colour"][1] < 1e-9 and s["orientation"][1] > 0.9
    # the grey base is ignored: without that, both based units would count as grey and unoriented
    assert abs(s["colour"][2] - s["colour"][0]) < 1e-9 and abs(s["orientation"][3] - s["orientation"][1]) < 1e-9
    summary = colour_orientation_summary(_units())
    assert summary["colour_units"] == 2 and summary["bw_units"] == 2
