"""detstream.output.images: PNGs drawn by matplotlib, read back by matplotlib, written
atomically, with matplotlib loaded only by the processes that draw."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from detstream.output.images import to_uint8, write_png


def test_png_reads_back_in_matplotlib_as_the_scaled_image(tmp_path):
    image = np.linspace(-3.0, 5.0, 7 * 11).reshape(7, 11)
    written = write_png(tmp_path / "bf.png", image)
    np.testing.assert_array_equal(written, to_uint8(image))
    rgba = matplotlib.image.imread(tmp_path / "bf.png")
    assert rgba.shape == (7, 11, 4)
    for channel in range(3):
        np.testing.assert_array_equal(np.rint(rgba[..., channel] * 255), written)
    assert np.all(rgba[..., 3] == 1.0)


def test_a_failed_draw_leaves_no_file(tmp_path, monkeypatch):
    def broken_imsave(fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("renderer gave up")

    monkeypatch.setattr(matplotlib.image, "imsave", broken_imsave)
    with pytest.raises(RuntimeError, match="renderer gave up"):
        write_png(tmp_path / "bf.png", np.ones((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_importing_the_output_package_does_not_load_matplotlib():
    code = "import sys, detstream.output; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
