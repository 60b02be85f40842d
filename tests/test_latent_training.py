"""Trainers of the built-in latent model ``mnist-latent-dit`` at toy size: the VAE objective, the exported
scaling factor, the latents file, and exact resumption of both the VAE and the latent-DiT trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from specdit.training.vae_trainer import (MnistVAEConfig, VAETrainConfig, encode_mean, latent_scaling_factor,
                                          train_vae, vae_loss)

# 3 levels -> two downsamplings: 1x32x32 -> 4x8x8, the real model's shapes at a fraction of its width
TOY_VAE = MnistVAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4)


def _images(n: int = 32) -> torch.Tensor:
    from specdit.data import mnist32_tensor

    return mnist32_tensor()[0][::5000 // n][:n]  # (n, 1, 32, 32), all classes


def _vae_cfg(out, steps: int) -> VAETrainConfig:
    # constant lr (no warmup, no decay) so that a 2-step run continued to 4 sees the 4-step run's lrs
    return VAETrainConfig(out=str(out), steps=steps, batch_size=4, warmup=0, min_lr_frac=1.0, threads=1,
                          ckpt_every=2, export_every=2, log_every=1, model=TOY_VAE)


def test_vae_loss_is_the_documented_objective():
    torch.manual_seed(0)
    vae = TOY_VAE.build().eval()
    x = _images(4)
    loss, parts = vae_loss(vae, x, torch.Generator().manual_seed(7), kl_weight=0.3, l2_weight=0.5)
    with torch.no_grad():  # by hand, with the same reparameterisation draw
        h = vae.quant_conv(vae.encoder(x))
        mu, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
        d = (vae.decode(z).sample - x).flatten(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        want = d.abs().sum(1).mean() + 0.5 * d.pow(2).sum(1).mean() + 0.3 * kl
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    # negative control: another noise draw gives another loss (the draw is really used)
    other, _ = vae_loss(vae, x, torch.Generator().manual_seed(8), kl_weight=0.3, l2_weight=0.5)
    assert other.item() != pytest.approx(want.item(), rel=1e-6)


def test_vae_trainer_resume_is_exact_and_export_scales_latents_to_unit_std(tmp_path):
    from specdit.models.dit import load_vae

    imgs = _images()
    train_vae(_vae_cfg(tmp_path / "a", 2), imgs)
    res = train_vae(_vae_cfg(tmp_path / "a", 4), imgs)  # resumes at step 2
    train_vae(_vae_cfg(tmp_path / "b", 4), imgs)
    assert res["step"] == 4
    wa = load_file(tmp_path / "a" / "export" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "export" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # negative control: a different seed trains different weights
    train_vae(VAETrainConfig(**{**_vae_cfg(tmp_path / "c", 4).__dict__, "seed": 1}), imgs)
    wc = load_file(tmp_path / "c" / "export" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)

    vae = load_vae(tmp_path / "a" / "export")
    scale = float(vae.config.scaling_factor)
    assert scale == pytest.approx(res["scaling_factor"], rel=1e-12) and scale != 1.0
    z = encode_mean(vae, imgs)
    assert z.shape == (32, 4, 8, 8)
    assert float((z * scale).double().std()) == pytest.approx(1.0, rel=1e-5)
    assert latent_scaling_factor(2 * z) == pytest.approx(scale / 2, rel=1e-6)


def test_latents_file_and_latent_dit_trainer_resume_is_exact(tmp_path):
    from specdit.data import load_training_data
    from specdit.models.dit import load_dit_diffusers, load_vae
    from specdit.training.dit_trainer import MnistDiTConfig, TrainConfig, train
    from specdit.training.latents import write_latents

    train_vae(_vae_cfg(tmp_path / "vae", 2))  # the whole subset, so the export's scale is the file's
    info = write_latents(tmp_path / "vae" / "export", tmp_path / "lat.npz")
    lat, labels = load_training_data(str(tmp_path / "lat.npz"))
    assert lat.shape == (5000, 4, 8, 8) and labels.shape == (5000,) and labels.max() == 9
    assert info["latent_std"] == pytest.approx(1.0, rel=1e-4)  # the scale was computed on this data set
    vae = load_vae(tmp_path / "vae" / "export")
    from specdit.data import mnist32_tensor

    first = mnist32_tensor()[0][:3]
    assert torch.allclose(lat[:3], encode_mean(vae, first) * vae.config.scaling_factor, atol=1e-5)

    def cfg(out, steps):
        return TrainConfig(out=str(out), steps=steps, batch_size=4, warmup=0, min_lr_frac=1.0, threads=1,
                           ckpt_every=2, export_every=2, log_every=1, data=str(tmp_path / "lat.npz"),
                           model=MnistDiTConfig(hidden=16, depth=1, heads=2, patch_size=2, sample_size=8,
                                                in_channels=4))

    train(cfg(tmp_path / "a", 2))
    res = train(cfg(tmp_path / "a", 4))
    train(cfg(tmp_path / "b", 4))
    assert res["step"] == 4
    wa = load_file(tmp_path / "a" / "export" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "export" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the DiTPipeline-like layout of the shipped model: transformer/ + vae/
    import shutil

    root = tmp_path / "pipe"
    shutil.copytree(tmp_path / "a" / "export", root / "transformer")
    shutil.copytree(tmp_path / "vae" / "export", root / "vae")
    model = load_dit_diffusers(root)
    assert model.sample_shape == (4, 8, 8) and model.num_tokens == 16 and model.vae is not None
    images = model.to_images(torch.randn(2, 4, 8, 8))
    assert images.shape == (2, 32, 32, 1) and images.dtype == torch.uint8


def test_decoder_finetune_keeps_the_encoder_and_the_scaling_factor(tmp_path):
    from specdit.models.dit import load_vae

    imgs = _images()
    base = train_vae(_vae_cfg(tmp_path / "a", 2), imgs)
    cfg = VAETrainConfig(**{**_vae_cfg(tmp_path / "ft", 2).__dict__, "init_from": str(tmp_path / "a" / "export"),
                            "freeze_encoder": True})
    ft = train_vae(cfg, imgs)
    wa = load_file(tmp_path / "a" / "export" / "diffusion_pytorch_model.safetensors")
    wf = load_file(tmp_path / "ft" / "export" / "diffusion_pytorch_model.safetensors")
    enc = [k for k in wa if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in wa if k.startswith("decoder.")]
    assert enc and dec
    assert all(torch.equal(wa[k], wf[k]) for k in enc)
    assert not all(torch.equal(wa[k], wf[k]) for k in dec)  # the decoder did train
    # same encoder weights; equal up to float summation order of the conv kernels (~1e-9 seen)
    assert ft["scaling_factor"] == pytest.approx(base["scaling_factor"], rel=1e-6)
    assert float(load_vae(tmp_path / "ft" / "export").config.scaling_factor) == ft["scaling_factor"]


# ------------------------------------------------------------------ the shipped mnist-latent-dit ----
def _shipped():
    from specdit.models.registry import BUILTIN_DITS

    root = BUILTIN_DITS["mnist-latent-dit"]
    if not (root / "transformer" / "config.json").is_file():
        pytest.skip("mnist-latent-dit assets not present")
    return root


def test_shipped_latent_model_loads_by_name_with_its_vae_and_drafter():
    from specdit.models.registry import builtin_drafter_folder, load_model

    _shipped()
    model = load_model("mnist-latent-dit")
    assert model.sample_shape == (4, 8, 8) and model.num_classes == 10 and model.has_null_class
    assert model.vae is not None and model.vae.config.latent_channels == 4
    assert (builtin_drafter_folder("mnist-latent-dit") / "config.json").is_file()
    with torch.no_grad():
        img = model.vae.decode(torch.zeros(1, 4, 8, 8)).sample
    assert img.shape == (1, 1, 32, 32)  # decoded at the VAE's resolution, 1 channel


@pytest.mark.slow
def test_shipped_vae_scaling_factor_and_reconstructions():
    """The shipped scaling factor is 1/std of the subset's posterior means, and reconstructions of 500 images
    (50 per class) keep the class for >= 98% (the shipped classifier gets 99.6% on the originals)."""
    from specdit.data import mnist32_tensor
    from specdit.models.dit import load_vae
    from specdit.training.vae_trainer import reconstruction_metrics

    vae = load_vae(_shipped() / "vae")
    images, labels = mnist32_tensor()
    z = encode_mean(vae, images)
    assert latent_scaling_factor(z) == pytest.approx(float(vae.config.scaling_factor), rel=1e-5)
    sub = torch.arange(0, 5000, 10)  # sorted by class: 50 per class
    m = reconstruction_metrics(vae, images[sub], labels[sub])
    assert m["class_accuracy_recon"] >= 0.98 and m["psnr_db"] > 24.0


def test_generate_and_bench_run_on_the_shipped_latent_model(tmp_path):
    """`specdit generate --model mnist-latent-dit` writes decoded 32x32 images (PNGs + grid) with the shipped
    feature drafter; `specdit bench` runs on it."""
    from PIL import Image
    from typer.testing import CliRunner

    from cli.main import app
    from specdit.models.registry import BUILTIN_DRAFTERS

    _shipped()
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "--model", "mnist-latent-dit", "--drafter", "feature", "--cfg-scale", "1.5",
                            "-n", "2", "--steps", "6", "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "run" / "00001.png").size == (32, 32)
    assert (tmp_path / "run" / "grid.png").is_file()
    # bench names drafters explicitly (its `feature` without a folder does not look up the built-in one)
    drafters = f"free,feature:{BUILTIN_DRAFTERS['mnist-latent-dit']}"
    r = runner.invoke(app, ["bench", "--model", "mnist-latent-dit", "--steps", "6", "-n", "2", "--cfg-scale", "1.5",
                            "--labels", "uniform", "--draft-lengths", "2", "--drafters", drafters,
                            "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output


def test_entry_point_refuses_bad_paths_in_one_line(tmp_path, capsys):
    from specdit.training.train_mnist_latent import main

    assert main(["latents", "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "z.npz")]) == 2
    assert main(["dit", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "run")]) == 2
    assert main(["vae-metrics", "--vae", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and err.count("error: ") == 3 and "Traceback" not in err
    assert not (tmp_path / "z.npz").exists()


def test_product_decoding_is_the_evaluated_decoding():
    """`to_images` of the loaded model (what generate and the workers write) equals the decoding the model
    card's numbers were measured with: ``vae.decode(z / config.scaling_factor)``, uint8."""
    from specdit.models.registry import load_model
    from specdit.training.latent_eval import decode_with_vae_scale

    _shipped()
    model = load_model("mnist-latent-dit")
    z = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = decode_with_vae_scale(model.vae, z)
    assert torch.equal(model.to_images(z), want)
    # negative control: SD-VAE's 0.18215 in place of this VAE's factor decodes other images
    from specdit.images import images_to_uint8

    with torch.no_grad():
        wrong = images_to_uint8(model.vae.decode(z / 0.18215).sample)
    assert not torch.equal(wrong, want)
