"""ARC and DyT beat the frozen-backbone segmenter at the same small budget, through the console
script in new processes (fit, then ``test --ckpt_path last``; :mod:`segmentation_cli_helpers`). A file
of its own, so the two segmentation console files run on both test workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmentation_cli_helpers import fit_and_test, overlay

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["arc", "dyt"])
def test_method_beats_the_frozen_segmenter(
    method: str, seg_mosaics: Path, frozen_seg_miou: float, tmp_path: Path
) -> None:
    miou = fit_and_test(method, overlay(tmp_path, seg_mosaics), tmp_path / "run")
    assert miou > frozen_seg_miou, (method, miou, frozen_seg_miou)
