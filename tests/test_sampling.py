"""Tests for qwen_edit.sampling: ComfyUI's sigma schedules, noise, samplers and CFG for the Qwen edit graph.

References are re-derived here in float64 from the formulas of ComfyUI, cited as
CUI = Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 (same tag as docs/comfy-semantics.md).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from qwen_edit import sampling as S

SHIFTS = (1.0, 3.0, 3.1)
DENOISES = (1.0, 0.6, 0.3)
STEPS = (1, 4, 7, 20, 33)


# ------------------------------------------------------------------------------------------------------
# float64 re-derivations of ComfyUI's schedules
# ------------------------------------------------------------------------------------------------------


def ref_shift(shift: float, t):
    # CUI:comfy/model_sampling.py:244-247
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def ref_table(shift: float) -> np.ndarray:
    # ModelSamplingDiscreteFlow, multiplier 1 (ModelSamplingAuraFlow): sigma(i/1000), i = 1..1000
    # CUI:comfy/model_sampling.py:259-263, CUI:comfy_extras/nodes_model_advanced.py:140-150
    return ref_shift(shift, np.arange(1, 1001, dtype=np.float64) / 1000)


def ref_schedule(scheduler: str, shift: float, n: int) -> np.ndarray:
    table = ref_table(shift)
    sigma_min, sigma_max = table[0], table[-1]
    if scheduler == "simple":  # CUI:comfy/samplers.py:413-420
        stride = 1000 / n
        return np.array([table[-(1 + int(k * stride))] for k in range(n)] + [0.0])
    if scheduler in ("normal", "sgm_uniform"):  # CUI:comfy/samplers.py:439-461
        start, end = sigma_max, sigma_min  # timestep(sigma) = sigma with multiplier 1
        if scheduler == "sgm_uniform":
            ts = np.linspace(start, end, n + 1)[:-1]
            return np.append(ref_shift(shift, ts), 0.0)
        if math.isclose(ref_shift(shift, end), 0, abs_tol=1e-5):
            return ref_shift(shift, np.linspace(start, end, n + 1))
        return np.append(ref_shift(shift, np.linspace(start, end, n)), 0.0)
    if scheduler == "karras":  # CUI:comfy/k_diffusion/sampling.py:20-26
        ramp = np.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
        return np.append((hi + ramp * (lo - hi)) ** 7, 0.0)
    if scheduler == "exponential":  # CUI:comfy/k_diffusion/sampling.py:29-32
        return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), 0.0)
    if scheduler == "beta":  # CUI:comfy/samplers.py:464-476, with scipy as ComfyUI
        scipy_stats = pytest.importorskip("scipy.stats")
        ts = np.rint(scipy_stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
        idx = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
        return np.append(table[idx], 0.0)
    raise AssertionError(scheduler)


def ref_sigmas(scheduler: str, shift: float, steps: int, denoise: float) -> np.ndarray:
    # KSampler.set_steps, CUI:comfy/samplers.py:1129-1139
    if denoise > 0.9999:
        return ref_schedule(scheduler, shift, steps)
    return ref_schedule(scheduler, shift, int(steps / denoise))[-(steps + 1) :]


# ------------------------------------------------------------------------------------------------------
# model sampling / timestep
# ------------------------------------------------------------------------------------------------------


def test_sigma_table_matches_formula_and_pins():
    for shift in SHIFTS:
        ms = S.FlowModelSampling(shift)
        assert ms.sigmas.dtype == torch.float32 and ms.sigmas.shape == (1000,)
        np.testing.assert_allclose(ms.sigmas.double().numpy(), ref_table(shift), rtol=3e-7, atol=0)
        assert float(ms.sigma_max) == 1.0  # exactly: shift*1/(1+shift-1)
    ms3 = S.FlowModelSampling(3.0)
    assert float(ms3.sigma_min) == pytest.approx(0.003 / 1.002, rel=1e-7)
    # multiplier 1 (AuraFlow) and 1000 (SD3) give the same table up to float32 rounding
    sd3 = S.FlowModelSampling(3.0, multiplier=1000.0)
    torch.testing.assert_close(sd3.sigmas, ms3.sigmas, rtol=2e-7, atol=0)


def test_timestep_is_sigma_for_auraflow():
    sig = torch.tensor([1.0, 0.75, 0.0029940119])
    assert torch.equal(S.FlowModelSampling(3.0).timestep(sig), sig)
    assert torch.equal(S.FlowModelSampling(3.0, multiplier=1000.0).timestep(sig), sig * 1000.0)
    assert S.FlowModelSampling(3.0).percent_to_sigma(1e-4) == pytest.approx(3 * 0.9999 / (1 + 2 * 0.9999))
    assert S.FlowModelSampling(3.0).percent_to_sigma(0.0) == 1.0
    assert S.FlowModelSampling(3.0).percent_to_sigma(1.0) == 0.0
    with pytest.raises(ValueError):
        S.FlowModelSampling(0.0)


def test_x0_from_flow_is_const_calculate_denoised():
    x = torch.randn(2, 16, 1, 2, 3)
    v = torch.randn(2, 16, 1, 2, 3).to(torch.bfloat16)
    sigma = torch.tensor([0.9, 0.25])
    out = S.x0_from_flow(x, sigma, v)
    assert out.dtype == torch.float32
    expected = torch.stack([x[0] - v[0].float() * 0.9, x[1] - v[1].float() * 0.25])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # scalar sigma broadcasts too
    torch.testing.assert_close(S.x0_from_flow(x, torch.tensor(0.5), v), x - v.float() * 0.5)


# ------------------------------------------------------------------------------------------------------
# schedulers
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", S.SCHEDULER_NAMES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("denoise", DENOISES)
@pytest.mark.parametrize("steps", STEPS)
def test_schedule_matches_comfy_formula(scheduler, shift, denoise, steps):
    got = S.get_sigmas(S.FlowModelSampling(shift), scheduler, steps, denoise)
    ref = ref_sigmas(scheduler, shift, steps, denoise)
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    assert float(got[-1]) == 0.0
    if scheduler != "beta" or len(ref) == steps + 1:
        assert len(got) == steps + 1
    # float32 (ComfyUI) against float64: a few float32 ulps, karras's **7 included
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=2e-6, atol=1e-9)


def test_lightning_four_step_schedule_is_pinned_bitwise():
    # 4 steps, simple, AuraFlow shift 3 = the diffusers Lightning schedule [1, .9, .75, .5, 0] (docs §2.8)
    got = S.get_sigmas(S.FlowModelSampling(3.0), "simple", 4)
    assert torch.equal(got, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float32))


def test_known_schedule_values():
    ms = S.FlowModelSampling(3.0)
    # docs §2.3: 4 steps at denoise 0.5 -> [0.75, 0.6429, 0.5, 0.3, 0]
    torch.testing.assert_close(
        S.get_sigmas(ms, "simple", 4, 0.5),
        torch.tensor([0.75, 0.642857143, 0.5, 0.3, 0.0]),
        rtol=0,
        atol=1e-7,
    )
    # docs §2.8: N=3 floors the indices: t = 1, 0.667, 0.334 -> [1, .85733, .60072, 0]
    torch.testing.assert_close(
        S.get_sigmas(ms, "simple", 3),
        torch.tensor([1.0, 3 * 0.667 / (1 + 2 * 0.667), 3 * 0.334 / (1 + 2 * 0.334), 0.0]),
        rtol=0,
        atol=2e-7,
    )
    # shift 1 simple is uniform in t
    torch.testing.assert_close(
        S.get_sigmas(S.FlowModelSampling(1.0), "simple", 4), torch.tensor([1, 0.75, 0.5, 0.25, 0])
    )
    # karras / exponential run from sigma_max = 1 to the table's sigma_min
    for name in ("karras", "exponential"):
        sig = S.get_sigmas(ms, name, 5)
        assert float(sig[0]) == pytest.approx(1.0, abs=1e-7)
        assert float(sig[-2]) == pytest.approx(0.003 / 1.002, rel=1e-6)
    # normal shifts twice at the low end (ComfyUI quirk): last sigma = shift(shift(0.001))
    assert float(S.get_sigmas(ms, "normal", 4)[-2]) == pytest.approx(
        ref_shift(3.0, ref_shift(3.0, 0.001)), rel=1e-6
    )


def test_beta_scheduler_indices_pinned_without_scipy():
    # rint(scipy.stats.beta.ppf(1 - k/N, .6, .6) * 999), computed once with scipy 1.17
    pins = {
        1: [999],
        2: [999, 500],
        4: [999, 823, 500, 176],
        7: [999, 928, 782, 598, 401, 217, 71],
        20: [999, 986, 959, 922, 876, 823, 765, 703, 637, 569, 500, 430, 362, 296, 234, 176, 123, 77, 40, 13],
    }
    ms = S.FlowModelSampling(3.0)
    for n, idx in pins.items():
        expected = torch.cat([ms.sigmas[idx], torch.zeros(1)])
        assert torch.equal(S.beta_scheduler(ms, n), expected), n
    # ComfyUI drops repeated indices, so from 139 steps on the schedule is shorter than steps+1
    assert len(S.beta_scheduler(ms, 139)) == 139


def test_beta_ppf_and_incomplete_beta_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.linspace(0, 1, 401)
    q = np.linspace(0, 1, 401)
    for a, b in ((0.6, 0.6), (0.5, 2.0), (2.0, 0.5), (3.0, 3.0), (1.0, 1.0)):
        np.testing.assert_allclose(
            S.betainc_regularized(a, b, x), scipy_stats.beta.cdf(x, a, b), rtol=0, atol=1e-14
        )
        np.testing.assert_allclose(S.beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b), rtol=0, atol=1e-13)
    # the scheduler's rounded indices agree (ties included: N even -> q = .5 -> rint(499.5) = 500)
    for n in [*range(1, 121), 124, 139, 200, 271, 333, 1000]:
        ts = 1 - np.linspace(0, 1, n, endpoint=False)
        assert np.array_equal(
            np.rint(S.beta_ppf(ts, 0.6, 0.6) * 999), np.rint(scipy_stats.beta.ppf(ts, 0.6, 0.6) * 999)
        ), n


def test_beta_ppf_closed_forms_without_scipy():
    # Beta(1,1) is uniform; Beta(a,1) has CDF x^a; symmetric median is exactly 1/2
    q = np.linspace(0, 1, 11)
    np.testing.assert_allclose(S.beta_ppf(q, 1.0, 1.0), q, atol=1e-15)
    np.testing.assert_allclose(S.beta_ppf(q, 2.5, 1.0), q ** (1 / 2.5), atol=1e-14)
    np.testing.assert_allclose(S.betainc_regularized(0.6, 1.0, q), q**0.6, atol=1e-14)
    assert S.beta_ppf(0.5, 0.6, 0.6) == 0.5
    with pytest.raises(ValueError):
        S.betainc_regularized(0.0, 1.0, 0.5)


def test_denoise_edge_cases():
    ms = S.FlowModelSampling(3.0)
    assert S.get_sigmas(ms, "simple", 4, 0.0).numel() == 0
    assert S.get_sigmas(ms, "simple", 4, -1.0).numel() == 0
    assert torch.equal(S.get_sigmas(ms, "simple", 4, 0.99995), S.get_sigmas(ms, "simple", 4, 1.0))
    # 0.9999 itself is not "full": int(4/0.9999) = 4 steps, last 5 kept = the same values
    assert torch.equal(S.get_sigmas(ms, "simple", 4, 0.9999), S.get_sigmas(ms, "simple", 4))
    with pytest.raises(ValueError, match="steps"):
        S.get_sigmas(ms, "simple", 0)


def test_scheduler_and_sampler_names_are_validated():
    ms = S.FlowModelSampling(3.0)
    with pytest.raises(ValueError, match=r"scheduler 'foo' is not supported; choose one of: simple, normal"):
        S.get_sigmas(ms, "foo", 4)
    with pytest.raises(ValueError, match=r"sampler_name 'foo' is not supported; choose one of: euler, "):
        S.sample(_const_model(0.0), S.empty_latent(1, 16, 16), seed=0, steps=2, cfg=1.0, sampler_name="foo")
    with pytest.raises(ValueError, match=r"scheduler 'bar' is not supported"):
        S.sample(_const_model(0.0), S.empty_latent(1, 16, 16), seed=0, steps=2, cfg=1.0, scheduler="bar")


# ------------------------------------------------------------------------------------------------------
# latents and noise
# ------------------------------------------------------------------------------------------------------


def test_empty_latent_is_empty_sd3_latent_image():
    lat = S.empty_latent(2, 64, 96)
    assert lat.shape == (2, 16, 8, 12) and lat.dtype == torch.float32 and not lat.any()
    for h, w in ((60, 64), (64, 8), (0, 64)):
        with pytest.raises(ValueError, match="multiple of 16"):
            S.empty_latent(1, h, w)
    with pytest.raises(ValueError):
        S.empty_latent(0, 64, 64)


def test_fix_empty_latent_channels():
    assert S.fix_empty_latent_channels(torch.zeros(2, 4, 3, 5)).shape == (2, 16, 1, 3, 5)
    assert S.fix_empty_latent_channels(torch.zeros(1, 16, 3, 5)).shape == (1, 16, 1, 3, 5)
    five = torch.randn(1, 16, 1, 3, 5)
    assert S.fix_empty_latent_channels(five) is five
    # a non-empty latent with another channel count is left alone (ComfyUI only repeats zeros)
    assert S.fix_empty_latent_channels(torch.ones(1, 4, 3, 5)).shape == (1, 4, 1, 3, 5)
    with pytest.raises(ValueError):
        S.fix_empty_latent_channels(torch.zeros(16, 3, 5))


SEEDS = (0, 1, 42, 645926465, 2**32 + 7, 2**63 - 1, 2**64 - 1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", (1, 2, 3))
def test_prepare_noise_is_one_cpu_randn_draw(seed, batch):
    latent = torch.zeros(batch, 16, 1, 4, 6)
    noise = S.prepare_noise(latent, seed)
    expected = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(seed))
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)
    # ComfyUI's own call uses the default generator: torch.manual_seed(seed) (CUI:comfy/sample.py:13-15)
    with torch.random.fork_rng(devices=[]):
        assert torch.equal(noise, torch.randn(latent.shape, generator=torch.manual_seed(seed)))
    # the singleton frame axis does not change the fill order
    assert torch.equal(S.prepare_noise(torch.zeros(batch, 16, 4, 6), seed), noise.squeeze(2))


def test_prepare_noise_batch_index_and_validation():
    latent = torch.zeros(2, 16, 1, 2, 2)
    g = torch.Generator("cpu").manual_seed(7)
    draws = [torch.randn(1, 16, 1, 2, 2, generator=g) for _ in range(3)]
    noise = S.prepare_noise(latent, 7, batch_index=[2, 0])
    assert torch.equal(noise, torch.cat([draws[2], draws[0]]))
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError):
            S.prepare_noise(latent, bad)


def test_noise_scaling_and_inverse():
    noise, latent = torch.randn(1, 16, 1, 2, 2), torch.randn(1, 16, 1, 2, 2)
    assert torch.equal(S.FlowModelSampling.noise_scaling(torch.tensor(1.0), noise, latent), noise)
    torch.testing.assert_close(
        S.FlowModelSampling.noise_scaling(torch.tensor(0.75), noise, latent), 0.75 * noise + 0.25 * latent
    )
    assert torch.equal(S.FlowModelSampling.inverse_noise_scaling(torch.tensor(0.0), latent), latent)
    torch.testing.assert_close(
        S.FlowModelSampling.inverse_noise_scaling(torch.tensor(0.5), latent), latent * 2
    )


# ------------------------------------------------------------------------------------------------------
# samplers on toy models
# ------------------------------------------------------------------------------------------------------


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _const_model(c):
    def model(x, sigma):
        return torch.full_like(x, c) if not torch.is_tensor(c) else c.expand_as(x).clone()

    return model


def toy(x, sigma):
    """A smooth nonlinear x0 predictor, to check the solvers' formulas step by step."""
    s = _bcast(sigma, x)
    return 0.6 * torch.tanh(x) * (1 - s) + 0.2 * s * x + 0.1


def _sigmas64(steps: int, shift: float = 3.0) -> torch.Tensor:
    return S.get_sigmas(S.FlowModelSampling(shift), "simple", steps).double()


class FixedNoise:
    """Noise sampler returning preset tensors and recording the (sigma, sigma_next) it was asked for."""

    def __init__(self, draws):
        self.draws = list(draws)
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.draws[len(self.calls) - 1]


@pytest.mark.parametrize("sampler", [S.sample_euler, S.sample_heun, S.sample_dpmpp_2m])
def test_deterministic_samplers_follow_exact_ode_for_constant_x0(sampler):
    # x0 = c for every x: the ODE dx/ds = (x - c)/s has x(s) = c + (x_0 - c) s/s_0, which Euler, Heun and
    # DPM++(2M) all integrate exactly. The callback sees every pre-step state.
    c = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    x0 = torch.randn(1, 3, dtype=torch.float64)
    sig = _sigmas64(7)
    seen = []
    out = sampler(
        _const_model(c), x0.clone(), sig, callback=lambda i, n, x, d: seen.append((i, n, x.clone(), d))
    )
    torch.testing.assert_close(out, c, rtol=0, atol=1e-12)
    assert [s[0] for s in seen] == list(range(7)) and all(s[1] == 7 for s in seen)
    for i, _, x, d in seen:
        torch.testing.assert_close(x, c + (x0 - c) * sig[i] / sig[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(d, c.expand_as(x))


def test_euler_and_heun_converge_at_their_order_to_the_gaussian_flow_solution():
    # Data N(0, v): the ideal x0 predictor is (1-s) v x / m(s)^2 with m(s)^2 = (1-s)^2 v + s^2, and the
    # probability-flow ODE maps x(1) to x(0) = sqrt(v) x(1) exactly.
    v = 0.25

    def model(x, sigma):
        s = _bcast(sigma, x)
        return (1 - s) * v / ((1 - s) ** 2 * v + s**2) * x

    x1 = torch.randn(2, 3, dtype=torch.float64)
    exact = x1 * math.sqrt(v)
    for sampler, order in ((S.sample_euler, 1), (S.sample_heun, 2)):
        errs = []
        for n in (20, 40, 80):
            sig = torch.tensor([ref_shift(3.0, 1 - k / n) for k in range(n)] + [0.0], dtype=torch.float64)
            errs.append(float((sampler(model, x1.clone(), sig) - exact).abs().max()))
        for a, b in zip(errs[:-1], errs[1:], strict=True):
            assert 2**order * 0.85 < a / b < 2**order * 1.15, (sampler.__name__, errs)


def test_heun_matches_hand_computation():
    x = torch.randn(2, 3, dtype=torch.float64)
    sig = _sigmas64(3)
    h = x.clone()
    for i in range(3):
        s, s2 = float(sig[i]), float(sig[i + 1])
        d = (h - toy(h, torch.tensor([s], dtype=torch.float64))) / s
        if s2 == 0:
            h = h + d * (s2 - s)
        else:
            x2 = h + d * (s2 - s)
            d2 = (x2 - toy(x2, torch.tensor([s2], dtype=torch.float64))) / s2
            h = h + 0.5 * (d + d2) * (s2 - s)
    torch.testing.assert_close(S.sample_heun(toy, x.clone(), sig), h, rtol=0, atol=1e-12)


def test_dpmpp_2m_matches_hand_computation():
    # Flow-form of DPM-Solver++(2M) in t = -log s: x' = (s'/s) x + (1 - s'/s) D~, where
    # D~ = D + (D - D_prev) / (2r), r = log(s_prev/s) / log(s/s'), and the last step into 0 returns D.
    x = torch.randn(2, 3, dtype=torch.float64)
    sig = _sigmas64(4)
    h, prev = x.clone(), None
    for i in range(4):
        s, s2 = float(sig[i]), float(sig[i + 1])
        d = toy(h, torch.tensor([s], dtype=torch.float64))
        if s2 == 0:
            h = d
        elif prev is None:
            h = (s2 / s) * h + (1 - s2 / s) * d
        else:
            r = math.log(float(sig[i - 1]) / s) / math.log(s / s2)
            h = (s2 / s) * h + (1 - s2 / s) * (d + (d - prev) / (2 * r))
        prev = d
    torch.testing.assert_close(S.sample_dpmpp_2m(toy, x.clone(), sig), h, rtol=0, atol=1e-12)


def test_euler_ancestral_rf_one_step_by_hand_and_marginal():
    s, s2 = 0.9, 0.75
    sig = torch.tensor([s, s2, 0.0], dtype=torch.float64)
    c, eps, n = 0.4, 1.3, -0.7
    x = torch.tensor([[(1 - s) * c + s * eps]], dtype=torch.float64)
    noise = FixedNoise([torch.tensor([[n]], dtype=torch.float64)])
    seen = []
    S.sample_euler_ancestral(
        _const_model(c),
        x.clone(),
        sig,
        noise_sampler=noise,
        callback=lambda i, t, xx, d: seen.append(xx.clone()),
    )
    x1 = float(seen[1])
    # hand: step down to s_d = s'^2/s (eta=1), Euler, rescale by (1-s')/(1-s_d), add renoise * n
    sd = s2 * s2 / s
    renoise = math.sqrt(s2**2 - sd**2 * (1 - s2) ** 2 / (1 - sd) ** 2)
    euler_down = (sd / s) * float(x) + (1 - sd / s) * c
    assert x1 == pytest.approx((1 - s2) / (1 - sd) * euler_down + renoise * n, abs=1e-14)
    # marginal: x' = (1-s') c + A eps + B n with A^2 + B^2 = s'^2 (the flow marginal at s')
    a_coef = (1 - s2) * sd / (1 - sd)
    assert x1 == pytest.approx((1 - s2) * c + a_coef * eps + renoise * n, abs=1e-14)
    assert a_coef**2 + renoise**2 == pytest.approx(s2**2, abs=1e-14)
    assert noise.calls == [(s, s2)]  # none for the final step into 0, which returns x0


def test_euler_ancestral_eta0_is_euler():
    x = torch.randn(2, 3, dtype=torch.float64)
    sig = _sigmas64(5)
    boom = FixedNoise([])  # any call would raise IndexError
    torch.testing.assert_close(
        S.sample_euler_ancestral(toy, x.clone(), sig, eta=0.0, noise_sampler=boom),
        S.sample_euler(toy, x.clone(), sig),
        rtol=0,
        atol=1e-12,
    )


def test_lcm_matches_hand_computation():
    x = torch.randn(1, 4, dtype=torch.float64)
    sig = _sigmas64(3)
    draws = [torch.randn(1, 4, dtype=torch.float64) for _ in range(2)]
    noise = FixedNoise(draws)
    h = x.clone()
    for i in range(3):
        s2 = float(sig[i + 1])
        h = toy(h, sig[i : i + 1])
        if s2 > 0:
            h = s2 * draws[i] + (1 - s2) * h
    torch.testing.assert_close(S.sample_lcm(toy, x.clone(), sig, noise_sampler=noise), h, rtol=0, atol=1e-12)
    assert len(noise.calls) == 2


@pytest.mark.parametrize("eta", (1.0, 0.5))
def test_dpmpp_2m_sde_matches_hand_computation(eta):
    # CONST half-logSNR lambda = log((1-s)/s); first sigma 1 replaced by shift(0.9999); midpoint correction.
    shift = 3.0
    x = torch.randn(1, 4, dtype=torch.float64)
    sig = _sigmas64(4, shift)
    draws = [torch.randn(1, 4, dtype=torch.float64) for _ in range(3)]
    noise = FixedNoise(draws)
    calls = []

    def model(xx, sigma):
        calls.append(float(sigma[0]))
        return toy(xx, sigma)

    got = S.sample_dpmpp_2m_sde(model, x.clone(), sig, shift=shift, eta=eta, noise_sampler=noise)

    s_list = [float(v) for v in sig]
    s_list[0] = shift * 0.9999 / (1 + (shift - 1) * 0.9999)
    h, prev, h_last = x.clone(), None, None
    for i in range(4):
        s, s2 = s_list[i], s_list[i + 1]
        d = toy(h, torch.tensor([s], dtype=torch.float64))
        if s2 == 0:
            h = d
        else:
            lam, lam2 = math.log((1 - s) / s), math.log((1 - s2) / s2)
            step = lam2 - lam
            phi = 1 - math.exp(-step * (eta + 1))
            h = (s2 / s) * math.exp(-step * eta) * h + (1 - s2) * phi * d
            if prev is not None:
                h = h + 0.5 * (1 - s2) * phi * (step / h_last) * (d - prev)
            h = h + draws[i] * s2 * math.sqrt(1 - math.exp(-2 * step * eta))
            h_last = step
        prev = d
    torch.testing.assert_close(got, h, rtol=0, atol=1e-12)
    assert calls[0] == pytest.approx(s_list[0]) and calls[0] < 1.0
    assert len(noise.calls) == 3 and noise.calls[0][0] == pytest.approx(s_list[0])


def test_dpmpp_2m_sde_eta0_first_step_is_euler():
    x = torch.randn(1, 4, dtype=torch.float64)
    sig = torch.tensor([0.8, 0.5], dtype=torch.float64)
    # two-point schedule without 0: one update, no noise with eta=0
    got = S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, eta=0.0, noise_sampler=FixedNoise([]))
    torch.testing.assert_close(got, S.sample_euler(toy, x.clone(), sig), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="solver_type"):
        S.sample_dpmpp_2m_sde(toy, x, sig, shift=3.0, solver_type="rk4")


def test_default_noise_sampler_is_a_seeded_generator_on_x_device():
    x = torch.zeros(2, 16, 1, 2, 3)
    ns = S.default_noise_sampler(x, seed=123)
    g = torch.Generator("cpu").manual_seed(123)
    for _ in range(3):
        assert torch.equal(ns(torch.tensor(1.0), torch.tensor(0.5)), torch.randn(x.shape, generator=g))


@pytest.mark.parametrize("name", ["euler_ancestral", "lcm"])
def test_stochastic_samplers_seed_default_noise_sampler(name):
    fn = {"euler_ancestral": S.sample_euler_ancestral, "lcm": S.sample_lcm}[name]
    x = torch.randn(1, 16, 1, 2, 2)
    sig = S.get_sigmas(S.FlowModelSampling(3.0), "simple", 4)
    a = fn(toy, x.clone(), sig, seed=9)
    assert torch.equal(a, fn(toy, x.clone(), sig, noise_sampler=S.default_noise_sampler(x, 9)))
    assert torch.equal(a, fn(toy, x.clone(), sig, seed=9))
    assert not torch.equal(a, fn(toy, x.clone(), sig, seed=10))


def test_brownian_tree_noise_sampler_matches_torchsde_convention():
    torchsde = pytest.importorskip("torchsde")
    x = torch.zeros(1, 16, 1, 2, 2)
    smin, smax = torch.tensor(0.1), torch.tensor(1.0)
    ns = S.BrownianTreeNoiseSampler(x, smin, smax, seed=31)
    tree = torchsde.BrownianTree(smin, torch.zeros_like(x), smax, entropy=31)
    s, s2 = torch.tensor(0.8), torch.tensor(0.5)
    # ComfyUI sorts the interval, flips the sign for a decreasing step and normalises by sqrt(|ds|)
    expected = -tree(s2, s) / (s - s2).sqrt()
    torch.testing.assert_close(ns(s, s2), expected)
    assert ns(s, s2).shape == x.shape


def test_dpmpp_2m_sde_is_deterministic_and_falls_back_without_torchsde(monkeypatch):
    x = torch.randn(1, 16, 1, 2, 2)
    sig = S.get_sigmas(S.FlowModelSampling(3.0), "simple", 4)
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde -> ImportError
    with pytest.warns(RuntimeWarning, match="torchsde is not installed"):
        a = S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, seed=5)
    with pytest.warns(RuntimeWarning):
        assert torch.equal(a, S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, seed=5))
    assert torch.equal(
        a, S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, noise_sampler=S.default_noise_sampler(x, 5))
    )


def test_dpmpp_2m_sde_uses_brownian_tree_when_available():
    pytest.importorskip("torchsde")
    x = torch.randn(1, 16, 1, 2, 2)
    sig = S.get_sigmas(S.FlowModelSampling(3.0), "simple", 4)
    a = S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, seed=5)
    tree = S.BrownianTreeNoiseSampler(x, sig[sig > 0].min(), sig.max(), seed=5)
    assert torch.equal(a, S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, noise_sampler=tree))
    assert not torch.equal(a, S.sample_dpmpp_2m_sde(toy, x.clone(), sig, shift=3.0, seed=6))


ALL_SAMPLERS = {
    "euler": lambda m, x, s, **k: S.sample_euler(m, x, s, **k),
    "euler_ancestral": lambda m, x, s, **k: S.sample_euler_ancestral(m, x, s, seed=0, **k),
    "heun": lambda m, x, s, **k: S.sample_heun(m, x, s, **k),
    "dpmpp_2m": lambda m, x, s, **k: S.sample_dpmpp_2m(m, x, s, **k),
    "dpmpp_2m_sde": lambda m, x, s, **k: S.sample_dpmpp_2m_sde(
        m, x, s, shift=3.0, noise_sampler=S.default_noise_sampler(x, 0), **k
    ),
    "lcm": lambda m, x, s, **k: S.sample_lcm(m, x, s, seed=0, **k),
}
assert tuple(ALL_SAMPLERS) == S.SAMPLER_NAMES


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_cancel_between_steps_and_callback_protocol(name):
    x = torch.randn(2, 16, 1, 2, 2)
    sig = S.get_sigmas(S.FlowModelSampling(3.0), "simple", 5)
    model_sigmas, polls, seen = [], [], []

    def model(xx, sigma):
        assert sigma.shape == (2,) and sigma.dtype == xx.dtype  # ComfyUI's sigmas[i] * s_in
        model_sigmas.append(float(sigma[0]))
        return toy(xx, sigma)

    def cancel():
        polls.append(1)
        return len(polls) == 3  # cancel before the third step

    def callback(i, total, xx, denoised):
        assert total == 5 and xx.shape == x.shape and denoised.shape == x.shape
        seen.append(i)

    with pytest.raises(S.SamplingCancelled) as exc:
        ALL_SAMPLERS[name](model, x.clone(), sig, callback=callback, cancel=cancel)
    assert exc.value.step == 2 and exc.value.total == 5
    assert seen == [0, 1]
    calls_per_step = 2 if name == "heun" else 1
    assert len(model_sigmas) == 2 * calls_per_step
    # an uncancelled run calls back once per step and returns a finite result
    seen.clear()
    out = ALL_SAMPLERS[name](model, x.clone(), sig, callback=callback, cancel=lambda: False)
    assert seen == [0, 1, 2, 3, 4] and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------
# CFG and CFGNorm
# ------------------------------------------------------------------------------------------------------


def test_needs_uncond():
    assert not S.needs_uncond(1.0)
    assert not S.needs_uncond(1.0 + 1e-12)  # math.isclose, as ComfyUI
    assert S.needs_uncond(1.01) and S.needs_uncond(4.0) and S.needs_uncond(0.0)


def test_cfg_combine_by_hand():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(S.cfg_combine(cond, uncond, 4.0), torch.tensor([5.0, -7.0]))
    assert torch.equal(S.cfg_combine(cond, torch.zeros(2), 1.0), cond)


def test_cfg_norm_by_hand():
    # [B=1, C=16, 1, h=1, w=2]: per-pixel 2-norms over the 16 channels
    cond = torch.zeros(1, 16, 1, 1, 2)
    pred = torch.zeros(1, 16, 1, 1, 2)
    cond[0, 0, 0, 0, 0], cond[0, 1, 0, 0, 0] = 3.0, 4.0  # |cond| = 5
    pred[0, 2, 0, 0, 0] = 10.0  # |pred| = 10 -> scale 0.5
    cond[0, 5, 0, 0, 1] = 6.0  # |cond| = 6
    pred[0, 3, 0, 0, 1] = 2.0  # |pred| = 2 -> ratio 3, clamped to 1
    out = S.cfg_norm(cond, pred, strength=0.8)
    expected = pred.clone()
    expected[..., 0] *= 5.0 / (10.0 + 1e-8) * 0.8
    expected[..., 1] *= 1.0 * 0.8
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=0)
    # strength 1 with norms well above 1e-8: equal to the input where |cfg| <= |cond|
    assert torch.equal(S.cfg_norm(cond, cond), cond)


def test_make_cfg_denoiser_skips_uncond_at_cfg_1():
    x = torch.randn(1, 16, 1, 2, 2) * 3
    sigma = torch.tensor([0.5])
    calls = []

    def model_fn(xx, s, uncond):
        calls.append(uncond)
        if uncond:
            raise AssertionError("negative branch evaluated at cfg 1")
        return xx * 0.5

    out = S.make_cfg_denoiser(model_fn, 1.0)(x, sigma)
    assert calls == [False]
    assert torch.equal(out, x * 0.5)  # CFGNorm at cfg 1 rescales by |c|/(|c|+1e-8) == 1.0 in float32


def test_make_cfg_denoiser_cfg_and_norm():
    x = torch.randn(2, 16, 1, 3, 3)
    sigma = torch.tensor([0.7, 0.7])
    calls = []

    def model_fn(xx, s, uncond):
        calls.append(uncond)
        return xx * (0.2 if uncond else 0.9) + 0.1

    cond, uncond = x * 0.9 + 0.1, x * 0.2 + 0.1
    combined = uncond + (cond - uncond) * 4.0
    out = S.make_cfg_denoiser(model_fn, 4.0)(x, sigma)
    assert calls == [False, True]
    torch.testing.assert_close(out, S.cfg_norm(cond, combined, 1.0))
    # CFGNorm keeps |x0| per pixel at most |cond|
    assert (torch.norm(out, dim=1) <= torch.norm(cond, dim=1) * (1 + 1e-6)).all()
    torch.testing.assert_close(S.make_cfg_denoiser(model_fn, 4.0, cfg_norm_strength=None)(x, sigma), combined)


# ------------------------------------------------------------------------------------------------------
# the KSampler-level helper
# ------------------------------------------------------------------------------------------------------


def _affine_model(c: float = 0.25):
    def model_fn(x, sigma, uncond):
        assert not uncond
        return torch.full_like(x, c)

    return model_fn


def test_sample_full_denoise_starts_from_noise_and_converges():
    latent = S.empty_latent(2, 32, 48)
    first = []
    out = S.sample(
        _affine_model(0.25), latent, seed=645926465, steps=4, cfg=1.0, shift=3.0,
        callback=lambda i, n, x, d: first.append(x.clone()) if i == 0 else None,
    )  # fmt: skip
    noise = torch.randn(2, 16, 1, 4, 6, generator=torch.Generator("cpu").manual_seed(645926465))
    assert torch.equal(first[0], noise)  # sigma0 = 1: x = noise exactly
    assert out.shape == (2, 16, 1, 4, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-6)


def test_sample_img2img_normalises_only_nonzero_latents():
    latent = torch.randn(1, 16, 4, 4)
    ins, outs, first = [], [], []

    def lat_in(z):
        ins.append(z)
        return (z - 1.0) / 2.0

    def lat_out(z):
        outs.append(z)
        return z * 2.0 + 1.0

    out = S.sample(
        _affine_model(0.1), latent, seed=3, steps=4, cfg=1.0, denoise=0.5, shift=3.0,
        process_latent_in=lat_in, process_latent_out=lat_out,
        callback=lambda i, n, x, d: first.append(x.clone()) if i == 0 else None,
    )  # fmt: skip
    noise = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(first[0], 0.75 * noise + 0.25 * (latent.unsqueeze(2) - 1.0) / 2.0)
    torch.testing.assert_close(out, torch.full_like(out, 0.1 * 2.0 + 1.0), rtol=0, atol=1e-6)
    assert len(ins) == 1 and len(outs) == 1

    def never(z):
        raise AssertionError("an all-zero latent must not be normalised")

    S.sample(_affine_model(0.1), S.empty_latent(1, 16, 16), seed=3, steps=2, cfg=1.0, denoise=0.5,
             process_latent_in=never)  # fmt: skip


def test_sample_denoise_zero_returns_latent_untouched():
    latent = torch.randn(1, 16, 4, 4)

    def model_fn(*a):
        raise AssertionError("model called at denoise 0")

    out = S.sample(model_fn, latent, seed=1, steps=4, cfg=4.0, denoise=0.0)
    assert torch.equal(out, latent.unsqueeze(2))


# torchsde rounds the tree's start to its tolerance and warns when ComfyUI's float32 sigma_min falls just
# below it; ComfyUI sees the same warning for the same inputs.
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_sample_runs_every_sampler_deterministically_with_cfg(name):
    latent = S.empty_latent(1, 16, 32)
    requested = []

    def model_fn(x, sigma, uncond):
        requested.append(uncond)
        return toy(x, sigma) * (0.5 if uncond else 1.0)

    kw = dict(seed=11, steps=3, cfg=3.0, sampler_name=name, scheduler="karras", shift=3.1)
    if name == "dpmpp_2m_sde" and "torchsde" not in sys.modules:
        pytest.importorskip("torchsde")
    a = S.sample(model_fn, latent, **kw)
    assert True in requested and False in requested
    assert torch.equal(a, S.sample(model_fn, latent, **kw))
    assert torch.isfinite(a).all()
    if name in ("euler_ancestral", "dpmpp_2m_sde", "lcm"):
        assert not torch.equal(a, S.sample(model_fn, latent, **{**kw, "seed": 12}))
