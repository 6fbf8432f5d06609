"""`invconv demo`: the Quick start's first command (NumPy only, no torch, no data)."""
import re
import struct
import zlib

import numpy as np
import pytest

from invconv import cli


def _png_pixels(path):
    """Decode the 8-bit RGB PNG that cli.save_png writes (filter type 0 rows only)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour == 2
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_demo_recovers_the_pictures_and_draws_them(tmp_path, capsys):
    out = tmp_path / "demo.png"
    cli.main(["demo", "--out", str(out), "--size", "24", "--kernel-size", "5"])
    text = capsys.readouterr().out
    error = float(re.search(r"max \|inv_conv2d\(conv2d\(x\)\) - x\| = (\S+)", text).group(1))
    assert error < 1e-12
    pixels = _png_pixels(out)
    # Three rows of four 24 x 24 pictures with 2-pixel gutters: originals,
    # convolved, recovered. The recovered row draws exactly the originals;
    # the convolved row differs visibly. (A recovered value off by 1e-14 may
    # round to the neighbouring 8-bit level.)
    rows = [pixels[2 + r * 26:2 + r * 26 + 24].astype(int) for r in range(3)]
    assert np.abs(rows[2] - rows[0]).max() <= 1
    assert np.abs(rows[1] - rows[0]).max() > 50
    first = np.rint(cli._demo_images(24)[0] * 255).transpose(1, 2, 0)
    assert np.abs(rows[0][:, 2:26] - first).max() <= 1


@pytest.mark.parametrize("argv", [["--strength", "1.5"], ["--size", "0"], ["--kernel-size", "0"]])
def test_demo_refuses_bad_options_in_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "d.png"), *argv])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_demo_output_in_a_missing_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(tmp_path / "missing" / "d.png")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
