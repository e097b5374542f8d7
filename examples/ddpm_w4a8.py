"""Quantize a diffusers UNet2DModel to W4A8 with the plain torch.ao workflow and sample with DDIMPipeline.

    python examples/ddpm_w4a8.py [--model DIR] [--steps 10] [--out ddpm_w4a8.png]

Without --model a small UNet2DModel is built from a config (random weights, runs in well under a minute); with
--model, a diffusers folder holding unet/ and scheduler/ (e.g. qdiff_ao/app/bundled/digits-ddpm).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qdiff_ao


def load(model_dir: str | None) -> tuple[UNet2DModel, DDIMScheduler]:
    if model_dir:
        return (UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval(),
                DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler"))
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       norm_num_groups=8, layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    return unet, DDIMScheduler(num_train_timesteps=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (calibration and sampling)")
    parser.add_argument("--out", default="ddpm_w4a8.png")
    args = parser.parse_args()

    unet, scheduler = load(args.model)
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    # 1. The sampler's own inputs, uniformly over the trajectory.
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=args.steps,
                                              num_timesteps=min(5, args.steps), samples_per_timestep=8)
    example = calib.example_inputs(2)
    # 2. Trace, split skip concats, and the user's own prepare_fx with our mapping and backend config; the
    #    custom config carries qdiff_ao's graph info (trace record, splits, config) through torch.ao.
    gm = qdiff_ao.passes.split_shortcut(qdiff_ao.trace(unet, example))
    prepared = prepare_fx(gm, qdiff_ao.get_qconfig_mapping(cfg), tuple(example.values()),
                          prepare_custom_config=qdiff_ao.prepare_custom_config(),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    qdiff_ao.passes.observe_softmax(prepared, cfg)
    # 3. Calibrate timestep by timestep, then lower to fbgemm/x86 INT8 kernels.
    qdiff_ao.calibrate(prepared, calib, batch_size=8)
    report = qdiff_ao.report.sensitivity(prepared, calib, rows_per_timestep=2)  # which quantizer hurts, when
    print(report.format_table(5))
    qdiff_ao.passes.correct_output(prepared, calib, unet, num_groups=4)  # mean eps error per timestep group
    qdiff_ao.passes.freeze_wide_softmax_observers(prepared)  # only acts on 16-bit softmax observers
    quantized = convert_fx(prepared, convert_custom_config=qdiff_ao.convert_custom_config(),
                           backend_config=qdiff_ao.get_backend_config(cfg))
    n_int8 = sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules())
    print(f"{n_int8} quantized modules; {len(qdiff_ao.graph_info(quantized).splits)} skip concats split")

    # 4. Drop into a diffusers pipeline and sample from the same noise as the float model.
    images = []
    for model in (unet, qdiff_ao.QuantizedUNet(quantized, like=unet).optimize_for_inference()):
        pipe = DDIMPipeline(unet=model, scheduler=scheduler)
        out = pipe(batch_size=4, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        images.append(out.images)
    print(f"max |FP - W4A8| pixel difference: {float((images[0] - images[1]).abs().max()):.3f}")
    from torchvision.utils import save_image

    save_image(torch.cat(images), args.out, nrow=4)
    print(f"wrote {args.out} (top row FP32, bottom row W4A8)")


if __name__ == "__main__":
    main()
