"""Sampling maths of the ComfyUI Qwen-Image-Edit-2509 graph, without ComfyUI.

Written in the style of k-diffusion's ``sampling.py``: plain functions over ``(model, x, sigmas, ...)``.
Every piece reproduces what ComfyUI computes, in the same float32 operation order: on the CPU, the sigma
table, all six schedulers, the initial noise and all six samplers (given the same model and noise) were
checked bit for bit against ComfyUI's own functions at the commit below.

Source of truth (re-implemented here, not copied), cited as ``CUI:path:lines``:
    CUI = Comfy-Org/ComfyUI@a125cd84b054a57729b5eecab930ca9408719832 (2025-10-11), which is the
    same code as comfyanonymous/ComfyUI at that date.

Conventions the pipeline must follow (see also ``sample``):

* **Model sampling.** ``ModelSamplingAuraFlow(shift)`` = discrete flow table of 1000 sigmas,
  ``sigma(t) = shift*t / (1 + (shift-1)*t)``, multiplier 1.0 (``FlowModelSampling``).
* **Timestep.** The DiT receives ``timestep(sigma) = sigma * multiplier = sigma`` in [0, 1], as a float32
  vector of shape [B] (CUI:comfy/model_base.py:181). The Qwen DiT's ``Timesteps(scale=1000)`` multiplies by
  1000 internally (CUI:comfy/ldm/qwen_image/model.py:62-77); diffusers' ``QwenImageTransformer2DModel`` has
  the same embedder, and its pipeline passes ``(sigma*1000)/1000``. So call the diffusers transformer with
  ``timestep=sigma`` directly: never ``sigma*1000``, and not ``(sigma*1000)/1000``, which can be 1 ulp off.
* **x0 wrapping.** Samplers call ``denoised = model(x, sigma)`` and expect an x0 prediction. The DiT
  predicts a flow velocity ``v``; wrap it like ComfyUI's CONST model sampling: cast ``x`` (float32) to the
  DiT dtype for the forward, take ``v.float()``, then ``x0 = x - v * sigma`` with the float32 ``x``
  (``x0_from_flow``; CUI:comfy/model_base.py:166-200, CUI:comfy/model_sampling.py:62-68).
* **Latents.** The sampler works on 5-D ``[B, 16, 1, H/8, W/8]`` float32 latents (Wan21 format, 3-D
  latents). 4-D latents are unsqueezed at dim 2; all-zero latents of another channel count are repeated to
  16 channels (``fix_empty_latent_channels``).
* **Noise.** One CPU float32 ``torch.randn`` draw of the whole 5-D latent shape from
  ``torch.Generator("cpu").manual_seed(seed)`` (``prepare_noise``); then ``x = sigma0*noise +
  (1-sigma0)*latent`` (``FlowModelSampling.noise_scaling``).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import SamplingCancelled

__all__ = [
    "LATENT_CHANNELS",
    "SAMPLER_NAMES",
    "SCHEDULER_NAMES",
    "BrownianTreeNoiseSampler",
    "FlowModelSampling",
    "SamplingCancelled",
    "beta_ppf",
    "betainc_regularized",
    "beta_scheduler",
    "calculate_sigmas",
    "cfg_combine",
    "cfg_norm",
    "default_noise_sampler",
    "empty_latent",
    "exponential_scheduler",
    "fix_empty_latent_channels",
    "get_sigmas",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "karras_scheduler",
    "make_cfg_denoiser",
    "needs_uncond",
    "normal_scheduler",
    "prepare_noise",
    "reshape_sigma",
    "sample",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sgm_uniform_scheduler",
    "simple_scheduler",
    "time_snr_shift",
    "x0_from_flow",
]

# Qwen-Image's latent format is Wan21: 16 channels, 3-D latents, 8x spatial downscale
# (CUI:comfy/latent_formats.py:411-413).
LATENT_CHANNELS = 16
VAE_DOWNSCALE = 8

SAMPLER_NAMES: tuple[str, ...] = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
SCHEDULER_NAMES: tuple[str, ...] = ("simple", "normal", "sgm_uniform", "karras", "exponential", "beta")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoised = model(x, sigma)``: x0 prediction; ``sigma`` is a float32 vector of shape [B]."""
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""``callback(step_index, total_steps, x, denoised)``, called after each step's (first) model call."""
CancelCheck = Callable[[], bool]
"""Polled before every step; returning True (or raising ``SamplingCancelled``) stops sampling."""
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``noise = noise_sampler(sigma, sigma_next)``: unit-variance noise shaped like the sampler state."""
ModelFn = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""``x0 = model_fn(x, sigma, uncond)``: the conditional (uncond=False) or negative (True) x0 prediction."""


def _check_name(kind: str, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise ValueError(f"{kind} {name!r} is not supported; choose one of: {', '.join(allowed)}")


# --------------------------------------------------------------------------------------------------------
# Model sampling: ModelSamplingDiscreteFlow + CONST, as ModelSamplingAuraFlow installs it.
# --------------------------------------------------------------------------------------------------------


def time_snr_shift(shift: float, t: torch.Tensor | float) -> torch.Tensor | float:
    """Flow time shift ``shift*t / (1 + (shift-1)*t)``, identity for shift 1.

    CUI:comfy/model_sampling.py:244-247.

    The expression order is ComfyUI's so that float32 results are bit-identical.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _percent_to_sigma(shift: float, percent: float) -> float:
    # Computed in Python floats, as ComfyUI does (CUI:comfy/model_sampling.py:279-284).
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return time_snr_shift(shift, 1.0 - percent)


def reshape_sigma(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a scalar or [B] sigma against an ``ndim`` tensor (CUI:comfy/model_sampling.py:24-28)."""
    sigma = torch.as_tensor(sigma)
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class FlowModelSampling:
    """ComfyUI's ``ModelSamplingDiscreteFlow`` with the ``CONST`` (rectified-flow) prediction type.

    ``ModelSamplingAuraFlow(shift)`` builds exactly this with ``multiplier=1.0``
    (CUI:comfy_extras/nodes_model_advanced.py:114-150); ``ModelSamplingSD3`` would use 1000, which is wrong
    for the Qwen DiT (it scales its timestep by 1000 itself).
    """

    def __init__(self, shift: float = 1.0, multiplier: float = 1.0, timesteps: int = 1000) -> None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        # Table of sigma(t_i), t_i = i/timesteps, i = 1..timesteps, in float32, computed on the CPU exactly
        # as ComfyUI does: int arange / int -> float32, times and then divided by the multiplier
        # (CUI:comfy/model_sampling.py:259-263, 276-277).
        ts = (torch.arange(1, timesteps + 1, 1) / timesteps) * self.multiplier
        self.sigmas: torch.Tensor = self.sigma(ts).float()

    def __repr__(self) -> str:
        return f"FlowModelSampling(shift={self.shift}, multiplier={self.multiplier})"

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The DiT's timestep input: ``sigma * multiplier`` (CUI:comfy/model_sampling.py:273-274)."""
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Inverse of ``timestep`` followed by the shift (CUI:comfy/model_sampling.py:276-277)."""
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        """Python-float sigma at a fraction of the sampling (CUI:comfy/model_sampling.py:279-284)."""
        return _percent_to_sigma(self.shift, percent)

    # CONST prediction type (CUI:comfy/model_sampling.py:62-76).
    @staticmethod
    def calculate_denoised(
        sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor
    ) -> torch.Tensor:
        return x0_from_flow(model_input, sigma, model_output)

    @staticmethod
    def noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor) -> torch.Tensor:
        """Start state ``sigma*noise + (1-sigma)*latent`` (CUI:comfy/model_sampling.py:70-72)."""
        sigma = reshape_sigma(sigma, noise.ndim)
        return sigma * noise + (1.0 - sigma) * latent_image

    @staticmethod
    def inverse_noise_scaling(sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``latent / (1 - sigma_last)``, identity when ending at 0 (CUI:comfy/model_sampling.py:74-76)."""
        sigma = reshape_sigma(sigma, latent.ndim)
        return latent / (1.0 - sigma)


def x0_from_flow(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CONST ``calculate_denoised``: ``x - v*sigma`` in float32 (CUI:comfy/model_sampling.py:66-68).

    ``x`` is the sampler's float32 state (not the bf16 copy fed to the DiT); ``v`` is the DiT output, upcast
    with ``.float()`` first as ComfyUI does (CUI:comfy/model_base.py:199-200). ``sigma`` may be a scalar or
    a per-batch vector [B].
    """
    v = v.float()
    return x - v * reshape_sigma(sigma, v.ndim)


# --------------------------------------------------------------------------------------------------------
# Schedulers. Each returns a float32 CPU tensor of length steps+1 ending in 0 (beta can be shorter, as in
# ComfyUI, when rounding makes two steps land on the same table entry).
# --------------------------------------------------------------------------------------------------------


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    # CUI:comfy/k_diffusion/sampling.py:16-17
    return torch.cat([x, x.new_zeros([1])])


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def simple_scheduler(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    """Every ``len(table)/steps``-th table entry from the top (CUI:comfy/samplers.py:413-420).

    The index is ``int(k * 1000/steps)`` in Python floats, so step counts that do not divide 1000 are
    floored: N=3 reads t = 1, 0.667, 0.334 rather than 1, 2/3, 1/3.
    """
    _check_steps(steps)
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(k * stride))]) for k in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def normal_scheduler(ms: FlowModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Uniform in model timestep between sigma_max and sigma_min (CUI:comfy/samplers.py:439-461).

    Note the ComfyUI quirk this keeps: the end point is ``timestep(sigma_min)``, an already shifted value,
    and ``sigma()`` shifts it again, so the lowest non-zero sigma is below the table's sigma_min.
    """
    _check_steps(steps)
    start = ms.timestep(ms.sigma_max)
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    # Elementwise float32 ops on the vector give the same bits as ComfyUI's per-element 0-dim calls.
    sigs = [float(s) for s in ms.sigma(timesteps)]
    if append_zero:
        sigs.append(0.0)
    return torch.tensor(sigs, dtype=torch.float32)


def sgm_uniform_scheduler(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    """``normal`` with steps+1 points and the last dropped (CUI:comfy/samplers.py:1065)."""
    return normal_scheduler(ms, steps, sgm=True)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule in float32 (CUI:comfy/k_diffusion/sampling.py:20-26)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_zero(sigmas)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log sigma, float32 (CUI:comfy/k_diffusion/sampling.py:29-32)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return _append_zero(sigmas)


def karras_scheduler(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    """Karras between the table's sigma_min/sigma_max as Python floats (CUI:comfy/samplers.py:1082-1084)."""
    _check_steps(steps)
    return get_sigmas_karras(steps, float(ms.sigma_min), float(ms.sigma_max))


def exponential_scheduler(ms: FlowModelSampling, steps: int) -> torch.Tensor:
    """Exponential between the table's sigma_min and sigma_max (CUI:comfy/samplers.py:1082-1084)."""
    _check_steps(steps)
    return get_sigmas_exponential(steps, float(ms.sigma_min), float(ms.sigma_max))


# Beta(alpha, beta) inverse CDF without scipy. ComfyUI calls scipy.stats.beta.ppf (CUI:comfy/samplers.py:467);
# only the rounded table index rint(ppf*999) matters, so double precision to ~1e-15 is plenty.


def _beta_contfrac(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Continued fraction of the incomplete beta function, modified Lentz method, vectorised over x.

    Converges quickly for x < (a+1)/(a+b+2); the caller uses the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    for larger x.
    """
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 1001):
        m2 = 2 * m
        # Even term of the fraction.
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        h = h * d * c
        # Odd term.
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return h


def betainc_regularized(a: float, b: float, x: np.ndarray | float) -> np.ndarray:
    """Regularized incomplete beta function I_x(a, b) (the Beta(a, b) CDF), float64, vectorised."""
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    out = np.where(x >= 1.0, 1.0, 0.0)
    inner = (x > 0.0) & (x < 1.0)
    if not np.any(inner):
        return out
    xi = x[inner]
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    # x^a (1-x)^b / B(a,b), shared by both branches.
    front = np.exp(a * np.log(xi) + b * np.log1p(-xi) - log_beta)
    low = xi < (a + 1.0) / (a + b + 2.0)
    val = np.empty_like(xi)
    if np.any(low):
        val[low] = front[low] * _beta_contfrac(a, b, xi[low]) / a
    if np.any(~low):
        val[~low] = 1.0 - front[~low] * _beta_contfrac(b, a, 1.0 - xi[~low]) / b
    out[inner] = val
    return out


def beta_ppf(q: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """Inverse of ``betainc_regularized`` in x (the Beta(a, b) quantile), float64, vectorised.

    Safeguarded Newton: a bracket [lo, hi] around the root shrinks with every CDF evaluation, and a Newton
    step that leaves it is replaced by bisection. Agrees with ``scipy.stats.beta.ppf`` to a few float64
    ulps (tested), which is what the beta scheduler's ``rint(ppf * 999)`` needs.
    """
    q = np.asarray(q, dtype=np.float64)
    # The CDF reaches 0 / 1 only at the ends; scipy returns exactly 0 / 1 there, and so do we.
    out = np.where(q >= 1.0, 1.0, 0.0)
    inner = (q > 0.0) & (q < 1.0)
    if a == b:
        # The median of a symmetric beta is exactly 1/2. Iterating could land an ulp below it, and the
        # beta scheduler's rint(0.5 * 999) = rint(499.5) sits on a rounding tie (scipy: 500).
        out = np.where(q == 0.5, 0.5, out)
        inner &= q != 0.5
    if not np.any(inner):
        return out
    qi = q[inner]
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    lo = np.zeros_like(qi)
    hi = np.ones_like(qi)
    x = np.full_like(qi, 0.5)
    active = np.ones(qi.shape, dtype=bool)
    for _ in range(2000):  # bisection alone reaches any float64 in < 1100 halvings; Newton needs far fewer
        f = betainc_regularized(a, b, x[active]) - qi[active]
        xa, lo_a, hi_a = x[active], lo[active], hi[active]
        lo_a = np.where(f < 0, xa, lo_a)
        hi_a = np.where(f > 0, xa, hi_a)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            pdf = np.exp((a - 1.0) * np.log(xa) + (b - 1.0) * np.log1p(-xa) - log_beta)
            newton = xa - f / pdf
        ok = np.isfinite(newton) & (newton >= lo_a) & (newton <= hi_a)
        x_new = np.where(f == 0, xa, np.where(ok, newton, 0.5 * (lo_a + hi_a)))
        # Rounding noise in the CDF (a few 1e-16) can make Newton cycle a few ulps around the root: stop on a
        # tiny step (quadratic convergence: x_new is then as good as the CDF allows) or a collapsed bracket.
        tight = hi_a - lo_a <= 64 * np.spacing(xa)
        x_new = np.where(tight, 0.5 * (lo_a + hi_a), x_new)
        done = tight | (np.abs(x_new - xa) <= 4 * np.spacing(xa))
        x[active], lo[active], hi[active] = x_new, lo_a, hi_a
        idx = np.flatnonzero(active)
        active[idx[done]] = False
        if not np.any(active):
            break
    out[inner] = x
    return out


# Process-wide: the beta scheduler's Newton solves cost milliseconds, and a worker asks for the same few
# step counts again and again. Bound: 256 entries of one int per step (a few KiB each).
@functools.lru_cache(maxsize=256)
def _beta_indices(steps: int, alpha: float, beta: float, total_timesteps: int) -> tuple[int, ...]:
    # CUI:comfy/samplers.py:464-476: quantiles 1, 1-1/N, ..., 1/N; rint(ppf * 999); consecutive duplicates
    # dropped. The indices do not depend on the shift, hence the cache.
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(beta_ppf(ts, alpha, beta) * total_timesteps)
    out: list[int] = []
    last_t = -1.0
    for t in ts:
        if t != last_t:
            out.append(int(t))
        last_t = t
    return tuple(out)


def beta_scheduler(ms: FlowModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta-distributed table indices (arXiv 2407.12173; CUI:comfy/samplers.py:464-476)."""
    _check_steps(steps)
    idx = _beta_indices(steps, float(alpha), float(beta), len(ms.sigmas) - 1)
    sigs = [float(ms.sigmas[i]) for i in idx]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


_SCHEDULERS: dict[str, Callable[[FlowModelSampling, int], torch.Tensor]] = {
    "simple": simple_scheduler,
    "normal": normal_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "beta": beta_scheduler,
}
assert tuple(_SCHEDULERS) == SCHEDULER_NAMES


def calculate_sigmas(ms: FlowModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    """The full schedule of ``steps`` steps (CUI:comfy/samplers.py:1076-1084)."""
    _check_name("scheduler", scheduler, SCHEDULER_NAMES)
    return _SCHEDULERS[scheduler](ms, steps)


def get_sigmas(ms: FlowModelSampling, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """KSampler's sigmas including ``denoise`` (CUI:comfy/samplers.py:1129-1139).

    * ``denoise > 0.9999``: the full schedule.
    * ``denoise <= 0``: an empty tensor; ``sample`` then returns the latent unchanged, as ComfyUI does.
    * otherwise: the schedule for ``int(steps/denoise)`` steps, of which the last ``steps+1`` sigmas are kept.
    """
    _check_name("scheduler", scheduler, SCHEDULER_NAMES)
    _check_steps(steps)
    if denoise is None or denoise > 0.9999:
        return calculate_sigmas(ms, scheduler, steps)
    if denoise <= 0.0:
        return torch.zeros([0], dtype=torch.float32)
    new_steps = int(steps / denoise)
    return calculate_sigmas(ms, scheduler, new_steps)[-(steps + 1) :]


# --------------------------------------------------------------------------------------------------------
# Latents and initial noise.
# --------------------------------------------------------------------------------------------------------


def empty_latent(batch_size: int, height: int, width: int) -> torch.Tensor:
    """``EmptySD3LatentImage``: zeros ``[B, 16, H//8, W//8]``, float32, on the CPU.

    CUI:comfy_extras/nodes_sd3.py:39-58.

    The node's widgets enforce min 16 and step 16, so width and height must be multiples of 16 (which also
    keeps the DiT's 2x2 patchify free of its circular padding). The result is 4-D like the node's;
    ``fix_empty_latent_channels`` / ``sample`` add the singleton frame dimension.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ValueError(f"{name} must be a multiple of 16 and at least 16, got {v}")
    return torch.zeros([batch_size, LATENT_CHANNELS, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE])


def fix_empty_latent_channels(latent: torch.Tensor) -> torch.Tensor:
    """Bring a latent to the Qwen DiT's 5-D form (CUI:comfy/sample.py:27-33).

    An all-zero latent with another channel count (``EmptyLatentImage`` gives 4) is repeated/narrowed to 16
    channels (CUI:comfy/utils.py:674-679); a 4-D latent gets the frame dimension: ``[B,16,1,h,w]``.
    """
    if latent.ndim not in (4, 5):
        raise ValueError(f"latent must be 4-D [B,C,h,w] or 5-D [B,C,1,h,w], got shape {tuple(latent.shape)}")
    if latent.shape[1] != LATENT_CHANNELS and torch.count_nonzero(latent) == 0:
        c = latent.shape[1]
        if c > LATENT_CHANNELS:
            latent = latent.narrow(1, 0, LATENT_CHANNELS)
        else:
            reps = [1, math.ceil(LATENT_CHANNELS / c)] + [1] * (latent.ndim - 2)
            latent = latent.repeat(reps).narrow(1, 0, LATENT_CHANNELS)
    if latent.ndim == 4:
        latent = latent.unsqueeze(2)
    return latent


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """Initial noise exactly as ComfyUI's ``prepare_noise`` (CUI:comfy/sample.py:8-25).

    One ``torch.randn`` of the whole latent shape, in the latent's dtype (float32 for every latent the
    graph makes), on the CPU, from a generator seeded with ``seed``. ComfyUI uses ``torch.manual_seed(seed)``,
    i.e. the default CPU generator; a fresh ``torch.Generator("cpu").manual_seed(seed)`` produces the same
    stream without touching global state. Image b of a batch is slice b of that one draw, not ``seed+b``.

    ``batch_index`` is ComfyUI's optional ``latent["batch_index"]`` (absent in the reference graph): one
    draw of a single image per index up to the largest, kept for the listed indices.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(
            latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu"
        )
    inds = np.asarray(batch_index, dtype=np.int64)
    unique, inverse = np.unique(inds, return_inverse=True)
    drawn = {}
    for i in range(int(unique[-1]) + 1):
        noise = torch.randn(
            [1] + list(latent.size())[1:],
            dtype=latent.dtype,
            layout=latent.layout,
            generator=generator,
            device="cpu",
        )
        if i in unique:
            drawn[i] = noise
    return torch.cat([drawn[int(unique[j])] for j in inverse.reshape(-1)], dim=0)


# --------------------------------------------------------------------------------------------------------
# Noise samplers for the stochastic samplers.
# --------------------------------------------------------------------------------------------------------


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """ComfyUI's per-step noise for euler_ancestral and lcm (CUI:comfy/k_diffusion/sampling.py:75-82).

    A generator on **x's device** seeded with the KSampler seed (CUI:comfy/samplers.py:980 passes it in
    ``extra_args``), then one ``randn`` of x's shape per call. This matches ComfyUI exactly when x lives on
    the same kind of device as in ComfyUI (CUDA in practice: CUDA's Philox stream differs from the CPU's
    Mersenne Twister). With ``seed=None`` the global RNG is used, as in ComfyUI.
    """
    if seed is not None:
        generator: torch.Generator | None = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    else:
        generator = None

    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return noise


class BrownianTreeNoiseSampler:
    """ComfyUI's Brownian-tree noise for dpmpp_2m_sde (CUI:comfy/k_diffusion/sampling.py:85-143).

    A ``torchsde.BrownianTree`` on the CPU (``cpu=True`` as ``sample_dpmpp_2m_sde`` builds it, so the result
    does not depend on the device) over [sigma_min, sigma_max], ``w0 = 0``, ``entropy = seed``; each call
    returns the increment W(sigma_next) - W(sigma) divided by sqrt(|sigma_next - sigma|). Needs the optional
    ``torchsde`` package (ComfyUI's own dependency); the values are those of the installed torchsde version.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: torch.Tensor | float,
        sigma_max: torch.Tensor | float,
        seed: int | None = None,
        cpu: bool = True,
    ) -> None:
        import torchsde  # optional dependency; see sample_dpmpp_2m_sde for the fallback

        self.cpu = cpu
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = self._sort(t0, t1)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, ()).item()
        if cpu:
            t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    @staticmethod
    def _sort(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        s0, s1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        t0, t1, sign = self._sort(s0, s1)
        device, dtype = t0.device, t0.dtype
        if self.cpu:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        w = self.tree(t0, t1).to(device=device, dtype=dtype) * (self.sign * sign)
        return w / (s1 - s0).abs().sqrt()


# --------------------------------------------------------------------------------------------------------
# Samplers (k-diffusion, as ComfyUI dispatches them for a CONST/flow model). Every sampler:
#   model(x, sigma_vec) -> x0, sigma_vec = sigma * ones([B]) in x's dtype (ComfyUI's `sigmas[i] * s_in`);
#   callback(i, total, x, denoised) after the step's first model call, before x is updated;
#   cancel() polled before each step.
# ComfyUI's KSampler never passes s_churn, so the churn branches of euler/heun are not reproduced.
# --------------------------------------------------------------------------------------------------------


def _denoise(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    callback: StepCallback | None,
    cancel: CancelCheck | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every sampler does first in step i: poll `cancel`, call the model, report progress.

    Returns (sigma, sigma_next, denoised). `callback` sees the state before the step's update.
    """
    total = len(sigmas) - 1
    if cancel is not None and cancel():
        raise SamplingCancelled(i, total)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = model(x, sigma * x.new_ones([x.shape[0]]))
    if callback is not None:
        callback(i, total, x, denoised)
    return sigma, sigma_next, denoised


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    # Karras ODE derivative (x - x0)/sigma; for a flow model, the velocity.
    # CUI:comfy/k_diffusion/sampling.py:60-62
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Euler (CUI:comfy/k_diffusion/sampling.py:184-206, s_churn=0): ``x += (x - x0)/s * (s' - s)``."""
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        x = x + _to_d(x, sigma, denoised) * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Euler ancestral, rectified-flow form (CUI:comfy/k_diffusion/sampling.py:210-212 dispatch, 234-259).

    For CONST models ComfyUI does not use the VP ``get_ancestral_step``: it steps down to
    ``s_d = s' * (1 + (s'/s - 1)*eta)`` with Euler, rescales by ``(1-s')/(1-s_d)`` and adds
    ``sqrt(s'^2 - s_d^2 (1-s')^2/(1-s_d)^2)`` of fresh noise, which keeps the flow marginal
    ``(1-s')*x0 + s'*noise``. The last step (s' = 0) returns x0. Noise: ``default_noise_sampler(x, seed)``.
    """
    noise_sampler = default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        if sigma_next == 0:
            x = denoised
            continue
        downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
        sigma_down = sigma_next * downstep_ratio
        alpha_next = 1 - sigma_next
        alpha_down = 1 - sigma_down
        renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
        ratio = sigma_down / sigma
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = (alpha_next / alpha_down) * x + noise_sampler(sigma, sigma_next) * s_noise * renoise
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Heun (CUI:comfy/k_diffusion/sampling.py:262-293, s_churn=0): mean of two slopes; Euler into 0."""
    total = len(sigmas) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        d = _to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next * s_in)
            d_2 = _to_d(x_2, sigma_next, denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (CUI:comfy/k_diffusion/sampling.py:786-808).

    ComfyUI uses ``t = -log(sigma)`` here even for flow models (unlike dpmpp_2m_sde), so the first-order
    update ``(s'/s) x + (1 - s'/s) x0`` is exactly flow Euler; later steps extrapolate x0 linearly in t.
    """
    total = len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        t, t_next = sigma.log().neg(), sigma_next.log().neg()
        h = t_next - t
        if old_denoised is None or sigma_next == 0:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            h_last = t - sigmas[i - 1].log().neg()
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    shift: float,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    solver_type: str = "midpoint",
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE for a CONST model (CUI:comfy/k_diffusion/sampling.py:812-862).

    * half-logSNR ``lambda = log((1 - s)/s)`` (CUI:comfy/k_diffusion/sampling.py:146-151);
    * a first sigma of 1 (lambda = -inf) is replaced by ``time_snr_shift(shift, 1 - 1e-4)`` before the loop,
      so the model's first call is at that sigma, not at 1 (CUI:comfy/k_diffusion/sampling.py:162-170); hence
      ``shift`` (the ModelSamplingAuraFlow shift) is required;
    * noise: ``BrownianTreeNoiseSampler`` over [min positive sigma, max sigma] of the *unmodified* schedule,
      seeded with ``seed``. Without ``torchsde`` installed this falls back, with a warning, to
      ``default_noise_sampler(x, seed)``: a valid SDE sample, but not ComfyUI's.
    """
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type {solver_type!r} is not supported; choose one of: heun, midpoint")
    if len(sigmas) <= 1:
        return x
    if noise_sampler is None:
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        try:
            noise_sampler = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=True)
        except ImportError:
            warnings.warn(
                "torchsde is not installed: dpmpp_2m_sde uses plain Gaussian noise instead of ComfyUI's "
                "Brownian tree, so results will not match ComfyUI (pip install torchsde to match).",
                RuntimeWarning,
                stacklevel=2,
            )
            noise_sampler = default_noise_sampler(x, seed=seed)
    if sigmas[0] >= 1:
        sigmas = sigmas.clone()
        sigmas[0] = _percent_to_sigma(shift, 1e-4)

    total = len(sigmas) - 1
    old_denoised = None
    h = h_last = None
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigma.logit().neg(), sigma_next.logit().neg()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = (
                    x
                    + noise_sampler(sigma, sigma_next)
                    * sigma_next
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    seed: int | None = None,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """LCM (CUI:comfy/k_diffusion/sampling.py:1003-1016): jump to x0, re-noise with CONST noise_scaling to s'.

    Noise: ``default_noise_sampler(x, seed)``, drawn only when s' > 0.
    """
    noise_sampler = default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next, denoised = _denoise(model, x, sigmas, i, callback, cancel)
        x = denoised
        if sigma_next > 0:
            x = FlowModelSampling.noise_scaling(sigma_next, noise_sampler(sigma, sigma_next), x)
    return x


# --------------------------------------------------------------------------------------------------------
# CFG and CFGNorm.
# --------------------------------------------------------------------------------------------------------


def needs_uncond(cfg: float) -> bool:
    """False when ComfyUI skips the negative pass: ``math.isclose(cfg, 1.0)`` (CUI:comfy/samplers.py:377-382).

    CFGNorm does not set ``disable_cfg1_optimization``, so the skip holds with it too.
    """
    return not math.isclose(cfg, 1.0)


def cfg_combine(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, cfg: float) -> torch.Tensor:
    """CFG on x0 predictions: ``uncond + (cond - uncond)*cfg`` (CUI:comfy/samplers.py:360-366).

    When the negative pass is skipped ComfyUI's uncond slot holds zeros (CUI:comfy/samplers.py:225, 351-352),
    so pass ``torch.zeros_like(cond)`` then; the result is ``cond`` exactly.
    """
    return uncond_denoised + (cond_denoised - uncond_denoised) * cfg


def cfg_norm(cond_denoised: torch.Tensor, denoised: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The ``CFGNorm`` post-CFG function (CUI:comfy_extras/nodes_cfg.py:51-78).

    Acts on x0 (ComfyUI's post-CFG ``denoised``, not on a noise/velocity prediction): per latent pixel the
    CFG result is scaled by ``clamp(|cond|_2 / (|cfg|_2 + 1e-8), 0, 1) * strength``, the 2-norms taken over
    dim 1, the 16 latent channels of ``[B,16,1,h,w]``.
    """
    norm_cond = torch.norm(cond_denoised, dim=1, keepdim=True)
    norm_pred = torch.norm(denoised, dim=1, keepdim=True)
    scale = (norm_cond / (norm_pred + 1e-8)).clamp(min=0.0, max=1.0)
    return denoised * scale * strength


def make_cfg_denoiser(model_fn: ModelFn, cfg: float, cfg_norm_strength: float | None = 1.0) -> Denoiser:
    """The ``denoised = model(x, sigma)`` the samplers call: ComfyUI's ``sampling_function`` for this graph.

    Calls ``model_fn(x, sigma, False)`` for the positive x0 and, only when ``needs_uncond(cfg)``,
    ``model_fn(x, sigma, True)`` for the negative; combines them with ``cfg_combine`` and then applies
    ``cfg_norm`` with ``cfg_norm_strength`` (the reference graph's ``CFGNorm(strength=1)``; None = no node).
    """
    use_uncond = needs_uncond(cfg)

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = model_fn(x, sigma, False)
        uncond = model_fn(x, sigma, True) if use_uncond else torch.zeros_like(cond)
        out = cfg_combine(cond, uncond, cfg)
        if cfg_norm_strength is not None:
            out = cfg_norm(cond, out, cfg_norm_strength)
        return out

    return denoiser


# --------------------------------------------------------------------------------------------------------
# Top level: KSampler.
# --------------------------------------------------------------------------------------------------------


def _run_sampler(
    name: str,
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    seed: int,
    shift: float,
    callback: StepCallback | None,
    cancel: CancelCheck | None,
) -> torch.Tensor:
    common = {"callback": callback, "cancel": cancel}
    if name == "euler":
        return sample_euler(denoiser, x, sigmas, **common)
    if name == "euler_ancestral":
        return sample_euler_ancestral(denoiser, x, sigmas, seed=seed, **common)
    if name == "heun":
        return sample_heun(denoiser, x, sigmas, **common)
    if name == "dpmpp_2m":
        return sample_dpmpp_2m(denoiser, x, sigmas, **common)
    if name == "dpmpp_2m_sde":
        return sample_dpmpp_2m_sde(denoiser, x, sigmas, shift=shift, seed=seed, **common)
    if name == "lcm":
        return sample_lcm(denoiser, x, sigmas, seed=seed, **common)
    raise AssertionError(name)  # names are validated before


def sample(
    model_fn: ModelFn,
    latent_image: torch.Tensor,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str = "euler",
    scheduler: str = "simple",
    denoise: float = 1.0,
    shift: float = 3.0,
    cfg_norm_strength: float | None = 1.0,
    batch_index: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    process_latent_in: Callable[[torch.Tensor], torch.Tensor] | None = None,
    process_latent_out: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: StepCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """``ModelSamplingAuraFlow(shift) -> CFGNorm(cfg_norm_strength) -> KSampler`` as ComfyUI runs it.

    Follows ``common_ksampler`` (CUI:nodes.py:1476-1497), ``KSampler`` (CUI:comfy/samplers.py:1129-1139),
    ``CFGGuider.sample/inner_sample`` (CUI:comfy/samplers.py:972-1015) and ``KSAMPLER.sample``
    (CUI:comfy/samplers.py:742-761):

    1. ``latent_image`` (4-D or 5-D, **raw** VAE space: a VAEEncode mean or ``empty_latent``) goes through
       ``fix_empty_latent_channels``; the sigmas come from ``get_sigmas``. No sigmas (denoise <= 0): that
       latent is returned as is.
    2. noise = ``prepare_noise(latent, seed, batch_index)`` on the CPU, then moved to ``device`` (default: the
       latent's device).
    3. Only a latent with a non-zero element is normalised with ``process_latent_in`` (the Wan21
       ``(z - mean)/std``); an all-zero latent stays zero (CUI:comfy/samplers.py:973-974).
    4. ``x = sigma0*noise + (1 - sigma0)*latent``; the sampler runs with the ``make_cfg_denoiser`` denoiser;
       ``inverse_noise_scaling``; ``.float()``; ``process_latent_out`` (Wan21 ``z*std + mean``).

    ``model_fn(x, sigma, uncond)`` returns an x0 prediction (see ``x0_from_flow``); ``uncond=True`` is
    never requested when ``needs_uncond(cfg)`` is False. The result is 5-D ``[B,16,1,h,w]``.
    """
    _check_name("sampler_name", sampler_name, SAMPLER_NAMES)
    _check_name("scheduler", scheduler, SCHEDULER_NAMES)
    ms = FlowModelSampling(shift=shift, multiplier=1.0)
    latent = fix_empty_latent_channels(latent_image)
    sigmas = get_sigmas(ms, scheduler, steps, denoise)
    if sigmas.numel() == 0:
        return latent
    noise = prepare_noise(latent, seed, batch_index)
    device = latent.device if device is None else torch.device(device)
    noise, latent, sigmas = noise.to(device), latent.to(device), sigmas.to(device)
    if process_latent_in is not None and torch.count_nonzero(latent) > 0:
        latent = process_latent_in(latent)
    x = ms.noise_scaling(sigmas[0], noise, latent)
    denoiser = make_cfg_denoiser(model_fn, cfg, cfg_norm_strength)
    samples = _run_sampler(
        sampler_name, denoiser, x, sigmas, seed=seed, shift=shift, callback=callback, cancel=cancel
    )
    samples = ms.inverse_noise_scaling(sigmas[-1], samples).float()
    if process_latent_out is not None:
        samples = process_latent_out(samples)
    return samples
