import numpy as np
import pytest
import torch

from ronan_fast.edits import apply_edit, check_edit


@pytest.mark.parametrize("edit", ["jpeg75", "jpeg1", "jpeg100", "1977", "tone", "any"])
def test_check_edit_accepts(edit):
    assert check_edit(edit) == edit


@pytest.mark.parametrize("edit", ["jpeg0", "jpeg101", "jpeg075", "jpeg", "JPEG75", "sepia", "Tone", "Any", 75, None, ""])
def test_check_edit_refuses_and_names_the_argument(edit):
    with pytest.raises(ValueError, match=r"--edit must be 'jpegQ'"):
        check_edit(edit, "--edit")


def _images(c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth random images (like photos), 8-bit valued
    x = torch.nn.functional.interpolate(torch.rand(3, c, 6, 6, generator=g), size=(32, 32), mode="bilinear",
                                        align_corners=False)
    return torch.round(x * 255) / 255


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_quality_orders_the_error(channels):
    x = _images(channels)
    errs = []
    for q in (10, 50, 95):
        e = apply_edit(x, f"jpeg{q}")
        assert e.shape == x.shape and e.dtype == torch.float32
        assert torch.equal(torch.round(e * 255) / 255, e)  # 8-bit values
        errs.append(float((e - x).square().mean()))
    assert errs[0] > errs[1] > errs[2] > 0
    # deterministic
    assert torch.equal(apply_edit(x, "jpeg50"), apply_edit(x, "jpeg50"))


def test_1977_changes_tones_not_layout():
    pytest.importorskip("pilgram")
    x = _images(3, seed=1)
    e = apply_edit(x, "1977")
    assert e.shape == x.shape
    assert float((e - x).abs().mean()) > 1e-2
    # a tone filter: the edited image stays strongly correlated with the original
    corr = np.corrcoef(x.flatten().numpy(), e.flatten().numpy())[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize("channels", [1, 3])
def test_tone_edit_is_a_repeatable_affine_tone_change(channels):
    from ronan_fast.metrics import MSE, ToneMSE

    x = _images(channels, seed=4)
    y = apply_edit(x, "tone")
    assert y.shape == x.shape and torch.equal(torch.round(y * 255) / 255, y)  # 8-bit valued
    assert torch.equal(apply_edit(x, "tone"), y)  # the draws come from the image: the same edit again
    assert torch.equal(apply_edit(x[1:2], "tone"), y[1:2])  # per image, whatever the batch
    changed, left = MSE()(x, y), ToneMSE()(x, y)
    assert bool((changed > 5e-5).all())  # it changes the image...
    # ...by a tone map per image (different ones), up to 8-bit rounding and clipping (clipping
    # between stages bends the map: what an affine fit cannot undo)
    assert bool((left < changed).all()) and float(left.sum()) < 0.2 * float(changed.sum()), (changed, left)
    gains = [float(((y[i] - y[i].mean()) * (x[i] - x[i].mean())).sum() / ((x[i] - x[i].mean()) ** 2).sum())
             for i in range(3)]
    assert len({round(g, 3) for g in gains}) == 3 and all(0.4 < g < 2.0 for g in gains), gains
    assert apply_edit(x[:0], "tone").shape == (0, *x.shape[1:])


@pytest.mark.parametrize("channels", [1, 3])
def test_any_edit_is_the_tone_edit_then_sometimes_jpeg(channels):
    """'any': each image's 'tone' edit (the same draws), then for about half of the images JPEG
    at a quality from 50 to 95, which leaves blocky errors no tone map undoes."""
    from ronan_fast.edits import _jpeg, to_uint8
    from ronan_fast.metrics import ToneMSE

    g = torch.Generator().manual_seed(7)
    x = torch.round(torch.nn.functional.interpolate(torch.rand(40, channels, 6, 6, generator=g), size=(32, 32),
                                                    mode="bilinear", align_corners=False) * 255) / 255
    y, t = apply_edit(x, "any"), apply_edit(x, "tone")
    assert torch.equal(apply_edit(x, "any"), y) and torch.equal(apply_edit(x[3:4], "any"), y[3:4])
    plain = [i for i in range(len(x)) if torch.equal(y[i], t[i])]
    assert 8 <= len(plain) <= 32, len(plain)  # about half are left as the tone edit made them
    for i in set(range(len(x))) - set(plain):
        # the others are the tone-edited image saved as JPEG at some quality from 50 to 95
        tone8 = to_uint8(t[i:i + 1])[0]
        hits = [q for q in range(50, 96) if np.array_equal(_jpeg(tone8, q), to_uint8(y[i:i + 1])[0])]
        assert hits, i
    # what JPEG leaves is larger than what the tone edit's rounding leaves
    left = ToneMSE()(x, y)
    jpeg = torch.tensor([i not in plain for i in range(len(x))])
    assert float(left[jpeg].median()) > 2 * float(left[~jpeg].median())


def test_random_edits_need_the_tone_metric():
    from ronan_fast.edits import check_edit_metric

    for edit in ("tone", "any"):
        check_edit_metric(edit, "mse-tone")
        with pytest.raises(ValueError, match=f"--edit {edit} .*--metric mse-tone"):
            check_edit_metric(edit, "mse", "--edit", "--metric")
    check_edit_metric("jpeg75", "mse")


def test_apply_edit_refuses_bad_images():
    with pytest.raises(ValueError, match="images must be a tensor"):
        apply_edit(torch.rand(3, 32, 32), "jpeg75")
    with pytest.raises(ValueError, match="images must be a tensor"):
        apply_edit(torch.rand(1, 2, 8, 8), "jpeg75")
    x = torch.rand(1, 1, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_edit(x, "jpeg75")
    with pytest.raises(ValueError, match="edit must be"):
        apply_edit(torch.rand(1, 1, 8, 8), "jpeg0")
