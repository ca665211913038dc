"""Decoding odd files to RGB and ADM's center_crop_arr."""
import numpy as np
import pytest
from PIL import Image

from data_fakes import jpeg_bytes, picture
from meanflow.data.crop import DecodeError, center_crop_arr, load_rgb


def adm_reference(pil_image, image_size):
    # guided-diffusion's center_crop_arr, restated independently as the oracle
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (20, 14), (1024, 130)])
def test_center_crop_matches_adm(size):
    img = Image.fromarray(picture(*size, seed=1))
    out = center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, adm_reference(img, 64))


def test_box_halving_then_bicubic():
    img = Image.fromarray(picture(600, 400, seed=2))
    # 400 >= 2*64 twice -> 150x100 after two BOX halvings, then bicubic to short side 64
    ref = img.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC)
    np.testing.assert_array_equal(center_crop_arr(img, 64), np.array(ref)[:, 16:80])


@pytest.mark.parametrize("kind", ["png", "cmyk", "gray", "rgb"])
def test_odd_files_decode_to_rgb(tmp_path, kind):
    p = tmp_path / "x.JPEG"  # a PNG named .JPEG too
    p.write_bytes(jpeg_bytes(48, 32, seed=3, kind=kind))
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (48, 32)
    want = picture(48, 32, seed=3).astype(float)
    got = np.asarray(im, dtype=float)
    if kind == "gray":
        want = np.repeat((want @ [0.299, 0.587, 0.114])[..., None], 3, -1)
        assert np.allclose(got[..., 0], got[..., 1]) and np.allclose(got[..., 1], got[..., 2])
    err = np.abs(got - want).mean()
    assert err < (0.5 if kind == "png" else 6), err


@pytest.mark.parametrize("kind", ["corrupt", "truncated"])
def test_bad_jpeg_error_names_file(tmp_path, kind):
    p = tmp_path / f"bad_{kind}.JPEG"
    p.write_bytes(jpeg_bytes(64, 64, seed=4, kind=kind))
    with pytest.raises(DecodeError, match=f"bad_{kind}.JPEG"):
        load_rgb(p)
    with pytest.raises(DecodeError, match="empty.JPEG"):
        (tmp_path / "empty.JPEG").write_bytes(b"")
        load_rgb(tmp_path / "empty.JPEG")
