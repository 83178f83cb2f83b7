"""UNet benchmark: train-step time of tta's `UNetModel` vs diffusers, and sampler cost of one clip.

1. Train step (forward + backward + AdamW step), batch ``--batch`` (2) of 8 x 256 x 16 latents
   (10.24 s of AudioLDM latent), fp32, at the Re-AudioLDM-S size with retrieval off (AudioLDM-S:
   model_channels 128, channel mult 1,2,3,5, 2 res blocks, attention at 8,4,2, head dim 32,
   FiLM 512) against diffusers ``UNet2DConditionModel`` configured identically (same blocks,
   ``attention_head_dim`` = level channels / 32 heads so both do the same arithmetic; the public
   AudioLDM port uses 8 heads everywhere, which costs the same). Parameter counts are logged
   for both. The two models are timed alternately, who goes first alternating too (one warm-up
   step each, then the median of ``--repeats``), so load from other processes hits both alike.
   Wall-clock and process CPU time are both reported: on a shared machine other jobs inflate
   both, wall-clock more. Goal: ours / diffusers <= 1.0.
2. Sampling one clip with classifier-free guidance (batch 2 = conditional + unconditional, scale
   3.5) with our UNet: DDIM 200 steps vs DPM-Solver++ 20 steps (diffusers ``DDIMScheduler`` /
   ``DPMSolverMultistepScheduler``, 1000 training steps, linear betas 0.0015-0.0195).

Run: ``python bench/unet_step.py --repeats 3`` (``--device cuda`` on a GPU, ``--precision bf16``
for bf16 autocast of both models). On 2 lightly loaded CPU
cores a batch-2 forward takes about 2.3 s, so the 200 DDIM steps dominate (8 minutes or more,
far longer on a busy machine); ``--skip-sampling`` times the train step only.
Nothing is asserted; results are logged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tta.nn.unet import UNetModel

log = logging.getLogger("bench.unet_step")

CHANNELS = (128, 256, 384, 640)
BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "linear",
}


def ours() -> UNetModel:
    """Re-AudioLDM-S UNet with retrieval off (= AudioLDM-S)."""
    return UNetModel(
        8,
        8,
        128,
        (1, 2, 3, 5),
        2,
        (8, 4, 2),
        num_head_channels=32,
        film_dim=512,
        self_attn2=True,
    )


def reference() -> nn.Module:
    """diffusers UNet2DConditionModel with the AudioLDM-S layout and the same head split."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=(256, 16),
        in_channels=8,
        out_channels=8,
        block_out_channels=CHANNELS,
        layers_per_block=2,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ),
        up_block_types=(
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
        ),
        cross_attention_dim=CHANNELS,
        attention_head_dim=tuple(c // 32 for c in CHANNELS),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512,
        class_embeddings_concat=True,
    )


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"`` (fp32 master weights, as Lightning's bf16-mixed)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(
    model: nn.Module, is_ours: bool, batch: int, device: torch.device, precision: str = "fp32"
) -> Callable[[], tuple[float, float]]:
    """A closure running one timed train step (random inputs made outside the timed part)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 8, 256, 16, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    film = torch.randn(batch, 512, device=device)
    target = torch.randn_like(x)

    def step() -> tuple[float, float]:
        """-> (wall-clock seconds, process CPU seconds)."""
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        with autocast(device, precision):
            if is_ours:
                out = model(x, t, film=film)
            else:
                out = model(x, t, encoder_hidden_states=None, class_labels=film).sample
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    return step


@torch.no_grad()
def sample_seconds(
    model: UNetModel,
    scheduler: object,
    steps: int,
    device: torch.device,
    scale: float = 3.5,
    precision: str = "fp32",
) -> tuple[float, float]:
    """(wall, CPU) seconds to sample one 8 x 256 x 16 latent with CFG (batch 2 per UNet call)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 8, 256, 16, device=device) * scheduler.init_noise_sigma
    film = torch.cat([torch.zeros(1, 512), torch.randn(1, 512)]).to(
        device
    )  # unconditional, conditional
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        with autocast(device, precision):
            eps_u, eps_c = model(inp, t.to(device).expand(2), film=film).float().chunk(2)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    """Parse arguments, run both benchmarks, log a summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed train steps per model (median reported)",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast forward passes of both models (fp32 weights and optimizer)")
    parser.add_argument("--ddim-steps", type=int, default=200)
    parser.add_argument("--dpm-steps", type=int, default=20)
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    log.info(
        "device %s, torch %s, %d CPU threads",
        device,
        torch.__version__,
        torch.get_num_threads(),
    )

    models = {
        "ours": ours().to(device).train(),
        "diffusers": reference().to(device).train(),
    }
    params = {
        name: sum(p.numel() for p in m.parameters()) for name, m in models.items()
    }
    for name, count in params.items():
        log.info("%-9s parameters: %d (%.1f M)", name, count, count / 1e6)
    steps = {
        name: train_step_fn(m, name == "ours", args.batch, device, args.precision)
        for name, m in models.items()
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for name, step in steps.items():
        log.info("warm-up %s: %.3f s wall, %.3f s CPU", name, *step())
    for r in range(args.repeats):
        order = (
            list(steps) if r % 2 == 0 else list(reversed(steps))
        )  # alternate who goes first
        for name in order:
            times[name].append(steps[name]())
        (ow, oc), (dw, dc) = times["ours"][-1], times["diffusers"][-1]
        log.info(
            "repeat %d: ours %.3f s wall / %.3f s CPU, diffusers %.3f s wall / %.3f s CPU",
            r + 1,
            ow,
            oc,
            dw,
            dc,
        )
    wall = {name: statistics.median(w for w, _ in v) for name, v in times.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in times.items()}
    del steps, models["diffusers"]

    rows = [
        f"train step (batch {args.batch}, 8x256x16, {args.precision}, {device.type}), median of {args.repeats}:",
        f"  ours       {wall['ours']:.3f} s wall  {cpu['ours']:.3f} s CPU  ({params['ours'] / 1e6:.1f} M parameters)",
        (
            f"  diffusers  {wall['diffusers']:.3f} s wall  {cpu['diffusers']:.3f} s CPU  "
            f"({params['diffusers'] / 1e6:.1f} M parameters)"
        ),
        (
            f"  ratio ours/diffusers = {wall['ours'] / wall['diffusers']:.3f} wall, "
            f"{cpu['ours'] / cpu['diffusers']:.3f} CPU (goal <= 1.0)"
        ),
    ]
    if not args.skip_sampling:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        model = models["ours"].eval()
        ddim_sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False)
        ddim = sample_seconds(model, ddim_sched, args.ddim_steps, device, precision=args.precision)
        log.info("DDIM %d steps: %.2f s wall, %.2f s CPU", args.ddim_steps, *ddim)
        dpm_sched = DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++")
        dpm = sample_seconds(model, dpm_sched, args.dpm_steps, device, precision=args.precision)
        log.info("DPM-Solver++ %d steps: %.2f s wall, %.2f s CPU", args.dpm_steps, *dpm)
        rows += [
            "sampling one 10.24 s clip with CFG (batch 2), our UNet:",
            f"  DDIM {args.ddim_steps} steps          {ddim[0]:.2f} s wall  {ddim[1]:.2f} s CPU",
            f"  DPM-Solver++ {args.dpm_steps} steps   {dpm[0]:.2f} s wall  {dpm[1]:.2f} s CPU",
            f"  ratio DDIM/DPM-Solver++ = {ddim[0] / dpm[0]:.2f} wall, {ddim[1] / dpm[1]:.2f} CPU",
        ]
    log.info("\n%s", "\n".join(rows))


if __name__ == "__main__":
    main()
