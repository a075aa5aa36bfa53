"""FDA's amplitude swap (uda_ray.fda), the FDA method's config, and the Charbonnier entropy it minimizes."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import NUM_CLASSES, TinySeg, make_batch
from uda_ray.config import OptimConfig
from uda_ray.config_loader import build
from uda_ray.errors import ConfigError
from uda_ray.fda import fda_reference, fda_source_to_target, low_freq_window, mixed_spectrum, window_half_size
from uda_ray.losses import charbonnier_entropy
from uda_ray.methods.fda import FDA, FDAConfig

DIMS = (-2, -1)


def images(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g, dtype=torch.float64) * 255.0  # float64: tight comparisons


def shifted_fft(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x), dim=DIMS)


def test_beta_zero_returns_the_source_exactly():
    src, tgt = images(2, 16, 20, 0), images(2, 16, 20, 1)
    out = fda_source_to_target(src, tgt, 0.0)
    assert torch.equal(out, src)


@pytest.mark.parametrize("h,w", [(32, 48), (33, 47), (32, 47), (31, 31)])
def test_window_is_centred_and_symmetric_under_frequency_negation(h, w):
    win = low_freq_window(h, w, 0.1)
    b = window_half_size(h, w, 0.1)
    assert win.sum() == (2 * b + 1) ** 2
    assert win[h // 2, w // 2]  # the zero frequency after fftshift
    # shifted index i holds frequency i - h // 2; negation maps it to index (h // 2 - (i - h // 2)) mod h
    rows = (2 * (h // 2) - torch.arange(h)) % h
    cols = (2 * (w // 2) - torch.arange(w)) % w
    assert torch.equal(win, win[rows][:, cols])


@pytest.mark.parametrize("h,w", [(32, 48), (33, 47), (32, 47)])
def test_amplitude_target_inside_window_source_outside_phase_source(h, w):
    beta = 0.1
    src, tgt = images(2, h, w, 0), images(2, h, w, 1)
    out = fda_source_to_target(src, tgt, beta)
    fo, fs, ft = shifted_fft(out), shifted_fft(src), shifted_fft(tgt)
    win = low_freq_window(h, w, beta).expand_as(fo)
    assert win.sum() > 2 * 3  # more than the DC term
    tol = 1e-6 * fs.abs().max()
    torch.testing.assert_close(fo.abs()[win], ft.abs()[win], rtol=0, atol=tol)
    torch.testing.assert_close(fo.abs()[~win], fs.abs()[~win], rtol=0, atol=tol)
    strong = (fs.abs() > 1e-3 * fs.abs().max()) & (fo.abs() > 1e-3 * fs.abs().max())
    unit_o, unit_s = fo / fo.abs(), fs / fs.abs()
    torch.testing.assert_close(unit_o[strong], unit_s[strong], rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w", [(32, 48), (33, 47), (32, 47)])
def test_inverse_of_mixed_spectrum_is_real(h, w):
    src, tgt = images(2, h, w, 0), images(2, h, w, 1)
    full = torch.fft.ifft2(mixed_spectrum(src, tgt, 0.1))
    assert full.real.abs().max() > 10
    assert full.imag.abs().max() < 1e-9  # float64 rounding only: the spectrum is Hermitian


@pytest.mark.parametrize("h,w,beta", [(32, 48, 0.1), (33, 47, 0.1), (32, 47, 0.2), (31, 31, 0.45),
                                     (64, 128, 0.01), (16, 16, 0.49)])
def test_half_spectrum_version_equals_the_full_spectrum_reference(h, w, beta):
    src, tgt = images(2, h, w, 0), images(2, h, w, 1)
    fast, ref = fda_source_to_target(src, tgt, beta), fda_reference(src, tgt, beta)
    assert (ref - src).abs().max() > 1  # the window is not empty: the images did change
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)  # float64 rounding only
    one = fda_source_to_target(src.float(), tgt[:1].float(), beta)  # float32, one broadcast target
    torch.testing.assert_close(one, fda_reference(src.float(), tgt[:1].float(), beta), rtol=0, atol=1e-3)


def test_batched_matches_per_image_and_single_target_broadcasts():
    src, tgt = images(3, 24, 32, 0), images(3, 24, 32, 1)
    out = fda_source_to_target(src, tgt, 0.09)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], fda_source_to_target(src[i:i + 1], tgt[i:i + 1], 0.09))
    one = fda_source_to_target(src, tgt[:1], 0.09)
    torch.testing.assert_close(one[2:], fda_source_to_target(src[2:], tgt[:1], 0.09))


def test_target_of_another_size_is_resized_and_float32_kept():
    src, tgt = images(2, 24, 32, 0).float(), images(2, 48, 64, 1).float()
    out = fda_source_to_target(src, tgt, 0.05)
    assert out.shape == src.shape and out.dtype == torch.float32
    assert not torch.equal(out, src)


def test_invalid_beta_and_batch_raise():
    src = images(2, 16, 16, 0)
    with pytest.raises(ValueError):
        fda_source_to_target(src, src, 0.5)
    with pytest.raises(ValueError):
        fda_source_to_target(src, images(3, 16, 16, 1), 0.1)


def test_charbonnier_entropy_hand_values():
    eta = 2.0
    uniform = torch.full((1, NUM_CLASSES, 2, 3), 1.0 / NUM_CLASSES)
    assert charbonnier_entropy(uniform, eta).item() == pytest.approx((1 + 1e-8) ** eta, rel=1e-6)
    one_hot = torch.zeros(1, NUM_CLASSES, 2, 3)
    one_hot[:, 1] = 1.0
    assert charbonnier_entropy(one_hot, eta).item() == pytest.approx(1e-8**eta, rel=1e-6)
    p = torch.tensor([0.5, 0.5] + [0.0] * (NUM_CLASSES - 2)).view(1, NUM_CLASSES, 1, 1)
    ent = math.log(2) / math.log(NUM_CLASSES)
    assert charbonnier_entropy(p, 1.5).item() == pytest.approx((ent**2 + 1e-8) ** 1.5, rel=1e-5)


def test_fda_config_validates_beta():
    assert build(FDAConfig, {"beta": 0.09}).beta == 0.09
    with pytest.raises(ConfigError):
        build(FDAConfig, {"beta": 0.5})
    with pytest.raises(ConfigError):
        build(FDAConfig, {"beta": -0.01})


def test_entropy_term_only_from_its_start_step():
    torch.manual_seed(0)
    m = FDA(TinySeg(), FDAConfig(beta=0.1, ent_start_step=1), OptimConfig(lr=1e-2), num_classes=NUM_CLASSES)
    assert "loss/ent_tgt" not in m.train_step(make_batch(0), 0)
    logs = m.train_step(make_batch(1), 1)
    assert torch.isfinite(logs["loss/ent_tgt"]) and torch.isfinite(logs["loss/seg_src"])


def test_fda_self_training_round_adds_the_charbonnier_entropy_of_the_pseudo_labelled_target():
    """FDA-MBT's round (SStrain.py): CE(stylized source) + CE(pseudo-labels) + entW * Charbonnier(target)."""
    import copy

    from uda_ray.methods.base import seg_loss
    from uda_ray.methods.self_training import SelfTraining, SelfTrainingConfig

    torch.manual_seed(0)
    model = TinySeg()
    ref = copy.deepcopy(model)
    cfg = build(SelfTrainingConfig, {"lambda_tgt": 1.0, "fda_beta": 0.1, "lambda_ent": 0.5,
                                     "entropy": "charbonnier", "eta": 2.0})
    m = SelfTraining(model, cfg, OptimConfig(lr=1e-2, momentum=0.0, weight_decay=0.0), num_classes=NUM_CLASSES)
    batch = make_batch(0)
    logs = m.train_step(batch, 0)

    src = fda_source_to_target(batch.src_img, batch.tgt_img, 0.1)
    out_t = ref(batch.tgt_img)
    ent = charbonnier_entropy(torch.softmax(out_t["out"], 1), 2.0)  # native resolution
    loss = seg_loss(out_t, batch.tgt_lbl, ref.aux_weights) + 0.5 * ent + seg_loss(ref(src), batch.src_lbl,
                                                                                     ref.aux_weights)
    loss.backward()
    assert logs["loss/ent"].item() == pytest.approx(ent.item(), rel=1e-5)
    for (name, p), q in zip(m.model_raw.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    # and the Charbonnier term is really in it: without it the gradient differs
    m0 = SelfTraining(copy.deepcopy(ref), build(SelfTrainingConfig, {"fda_beta": 0.1}), OptimConfig(lr=1e-2),
                      num_classes=NUM_CLASSES)
    m0.train_step(batch, 0)
    assert not torch.allclose(next(m0.model_raw.parameters()).grad, next(m.model_raw.parameters()).grad)


def test_self_training_entropy_kind_is_validated():
    from uda_ray.methods.self_training import SelfTrainingConfig

    with pytest.raises(ConfigError, match="entropy"):
        build(SelfTrainingConfig, {"entropy": "shannon"})
