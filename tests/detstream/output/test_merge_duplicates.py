"""A re-routed position counted by two nodes: the merge keeps the first copy, even when a
whole block of the second part is made only of later copies."""

from __future__ import annotations

import numpy as np

from detstream.output.merge import merge_parts
from detstream.output.parts import PartWriter


def test_a_block_of_only_later_copies_is_skipped(tmp_path):
    events = {p: np.array([p, p + 1], np.uint32) for p in range(8)}
    paths = []
    for name, positions in (("a", range(8)), ("b", range(4))):
        with PartWriter(tmp_path / f"{name}.h5", (16, 16)) as w:
            for p in positions:
                w.add(p, events[p])
        paths.append(tmp_path / f"{name}.h5")
    report = merge_parts(paths, tmp_path / "out.h5", 4, 2, (16, 16), on_duplicate="first",
                         block_positions=2, bright_field=False)
    assert report.duplicates == 4 and report.missing == [] and report.total_events == 16


def test_copies_of_a_position_that_differ_are_left_out_as_conflicted(tmp_path):
    paths = []
    for name, extra in (("a", 0), ("b", 1)):  # both hold 0..3; position 2's events differ
        with PartWriter(tmp_path / f"{name}.h5", (16, 16)) as w:
            for p in range(4):
                w.add(p, np.array([p, p + 1 + (extra if p == 2 else 0)], np.uint32))
        paths.append(tmp_path / f"{name}.h5")
    report = merge_parts(paths, tmp_path / "out.h5", 4, 1, (16, 16), on_duplicate="first", bright_field=False)
    assert report.conflicted == [2] and report.missing == [2]
    assert report.duplicates == 3 and report.total_events == 6
    excluded = merge_parts(paths[:1], tmp_path / "out2.h5", 4, 1, (16, 16), on_duplicate="first",
                           bright_field=False, exclude=[1])
    assert excluded.missing == [1] and excluded.conflicted == [] and excluded.total_events == 6
