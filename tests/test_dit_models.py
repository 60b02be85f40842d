"""DiT adapters, loaders, CFG, VAE decoding and the model registry, on tiny random models.

The original-DiT reference below is written from the paper / facebookresearch/DiT ``models.py`` *layout*
(parameter names and shapes), independently of the converter in ``specdit.models.dit``.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from specdit.models.base import EpsModel
from specdit.images import images_to_uint8
from specdit.models.denoisers import CFGDenoiser, DiTDenoiser, decode_latents
from specdit.models.dit import (
    load_dit_diffusers,
    load_dit_original,
    load_dit_safetensors,
    load_vae,
    save_dit_diffusers,
    save_dit_safetensors,
)
from specdit.models.registry import load_model

# tiny original DiT: 4 latent channels, 8x8 input, patch 2 -> 16 tokens, hidden 32, 2 heads, learn_sigma
IN_CH, SIZE, PATCH, HIDDEN, HEADS, DEPTH, CLASSES = 4, 8, 2, 32, 2, 2, 5
TOKENS = (SIZE // PATCH) ** 2


# ---------------------------------------------------------------- reference original DiT (functional) ----
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))  # (dim/2,)
    angles = np.outer(pos.reshape(-1), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def ref_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT 2-D sin-cos table (1, grid*grid, dim): first half encodes the column (w), second the row."""
    ww, hh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)
    return torch.from_numpy(emb).float()[None]


def ref_t_freq(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)  # (N, 256)


def random_original_state_dict(seed: int = 0, learn_sigma: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    out_ch = 2 * IN_CH if learn_sigma else IN_CH

    def r(*shape, s=0.2):
        return (s * torch.randn(*shape, generator=g)).float()

    sd = {
        "x_embedder.proj.weight": r(HIDDEN, IN_CH, PATCH, PATCH),
        "x_embedder.proj.bias": r(HIDDEN),
        "pos_embed": ref_pos_embed(HIDDEN, SIZE // PATCH),
        "t_embedder.mlp.0.weight": r(HIDDEN, 256, s=0.05),
        "t_embedder.mlp.0.bias": r(HIDDEN),
        "t_embedder.mlp.2.weight": r(HIDDEN, HIDDEN),
        "t_embedder.mlp.2.bias": r(HIDDEN),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, HIDDEN),
        "final_layer.adaLN_modulation.1.weight": r(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": r(2 * HIDDEN),
        "final_layer.linear.weight": r(PATCH * PATCH * out_ch, HIDDEN),
        "final_layer.linear.bias": r(PATCH * PATCH * out_ch),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}"
        sd.update({
            f"{b}.attn.qkv.weight": r(3 * HIDDEN, HIDDEN), f"{b}.attn.qkv.bias": r(3 * HIDDEN),
            f"{b}.attn.proj.weight": r(HIDDEN, HIDDEN), f"{b}.attn.proj.bias": r(HIDDEN),
            f"{b}.mlp.fc1.weight": r(4 * HIDDEN, HIDDEN), f"{b}.mlp.fc1.bias": r(4 * HIDDEN),
            f"{b}.mlp.fc2.weight": r(HIDDEN, 4 * HIDDEN), f"{b}.mlp.fc2.bias": r(HIDDEN),
            f"{b}.adaLN_modulation.1.weight": r(6 * HIDDEN, HIDDEN), f"{b}.adaLN_modulation.1.bias": r(6 * HIDDEN),
        })
    return sd


def ref_forward(sd: dict, x, t, y):
    """Original DiT forward (adaLN-Zero blocks); returns (full output incl. sigma channels, top feature)."""
    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def ln(h):
        return F.layer_norm(h, (HIDDEN,), eps=1e-6)

    n = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    c = lin(F.silu(lin(ref_t_freq(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]  # (N, D)
    hd = HIDDEN // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}"
        s1, sc1, g1, s2, sc2, g2 = lin(F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(modulate(ln(h), s1, sc1), f"{b}.attn.qkv").reshape(n, TOKENS, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, H, T, hd)
        att = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        a = lin((att @ v).transpose(1, 2).reshape(n, TOKENS, HIDDEN), f"{b}.attn.proj")
        h = h + g1[:, None] * a
        m = lin(F.gelu(lin(modulate(ln(h), s2, sc2), f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + g2[:, None] * m
    feats = h
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulate(ln(h), shift, scale), "final_layer.linear")  # (N, T, p*p*C)
    side, cout = SIZE // PATCH, out.shape[-1] // (PATCH * PATCH)
    out = out.reshape(n, side, side, PATCH, PATCH, cout).permute(0, 5, 1, 3, 2, 4).reshape(n, cout, SIZE, SIZE)
    return out, feats


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_CH, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 517, 999][:n] + [250] * max(0, n - 3), dtype=torch.long)
    y = torch.tensor([0, 4, CLASSES][:n] + [1] * max(0, n - 3), dtype=torch.long)  # includes the null class
    return x, t, y


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory):
    sd = random_original_state_dict()
    path = tmp_path_factory.mktemp("orig") / "DiT-tiny.pt"
    torch.save(sd, path)
    return path, sd


# ------------------------------------------------------------------------------------------- tests ----
def test_original_loader_matches_reference(original_ckpt):
    path, sd = original_ckpt
    model = load_dit_original(path, num_heads=HEADS)
    assert isinstance(model, EpsModel)
    assert model.sample_shape == (IN_CH, SIZE, SIZE) and model.num_classes == CLASSES and model.learned_sigma
    x, t, y = _inputs()
    out = model(x, t, y)
    ref_full, ref_feat = ref_forward(sd, x, t, y)
    assert out.eps.shape == (3, IN_CH, SIZE, SIZE)  # learned-sigma channels dropped
    assert out.features.shape == (3, TOKENS, HIDDEN)
    torch.testing.assert_close(out.features, ref_feat, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.eps, ref_full[:, :IN_CH], atol=2e-5, rtol=1e-5)


def test_original_checkpoint_wrapped_in_training_dict(tmp_path, original_ckpt):
    _, sd = original_ckpt
    torch.save({"model": sd, "ema": {"module." + k: v for k, v in sd.items()}, "steps": torch.tensor(3)},
               tmp_path / "0001000.pt")
    model = load_dit_original(tmp_path / "0001000.pt", num_heads=HEADS)
    x, t, y = _inputs()
    torch.testing.assert_close(model(x, t, y).eps, ref_forward(sd, x, t, y)[0][:, :IN_CH], atol=2e-5, rtol=1e-5)


def test_all_loaders_agree(tmp_path, original_ckpt):
    path, _ = original_ckpt
    base = load_dit_original(path, num_heads=HEADS)
    save_dit_diffusers(base, tmp_path / "diffusers")
    save_dit_safetensors(base, tmp_path / "dit.safetensors")
    via_folder = load_dit_diffusers(tmp_path / "diffusers")
    via_st = load_dit_safetensors(tmp_path / "dit.safetensors")
    assert via_folder.original_timestep_embedding and via_st.original_timestep_embedding
    x, t, y = _inputs()
    a, b, c = base(x, t, y), via_folder(x, t, y), via_st(x, t, y)
    assert torch.equal(a.eps, c.eps) and torch.equal(a.features, c.features)  # bit-exact round trip
    # the diffusers folder recomputes the sin-cos pos_embed in float32 (the original's is float64-rounded)
    torch.testing.assert_close(a.eps, b.eps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.features, b.features, atol=1e-6, rtol=1e-6)
    # and through the registry (heads are an option of original checkpoints only)
    for p in (tmp_path / "diffusers", tmp_path / "dit.safetensors"):
        assert isinstance(load_model(str(p)), DiTDenoiser)
        with pytest.raises(ValueError, match="--num-heads applies to original DiT checkpoints"):
            load_model(str(p), num_heads=HEADS)
    assert isinstance(load_model(str(path), num_heads=HEADS), DiTDenoiser)
    torch.testing.assert_close(load_model(str(tmp_path / "dit.safetensors"))(x, t, y).eps, a.eps, atol=0, rtol=0)


def _tiny_diffusers(out_channels=IN_CH, seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HIDDEN // HEADS, in_channels=IN_CH,
                               out_channels=out_channels, num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH,
                               num_embeds_ada_norm=CLASSES)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every layer clearly non-trivial
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tr.eval()


@pytest.mark.parametrize("out_channels", [IN_CH, 2 * IN_CH])
def test_denoiser_equals_diffusers_forward_and_drops_sigma(tmp_path, out_channels):
    tr = _tiny_diffusers(out_channels)
    captured = {}
    hook = tr.transformer_blocks[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x, t, y = _inputs()
    with torch.no_grad():
        full = tr(x, timestep=t, class_labels=y).sample  # (N, out_channels, H, W)
    hook.remove()
    model = DiTDenoiser(tr)
    out = model(x, t, y)
    assert model.learned_sigma == (out_channels == 2 * IN_CH)
    assert torch.equal(out.eps, full[:, :IN_CH])
    assert torch.equal(out.features, captured["f"])
    assert torch.equal(model.eps_from_features(out.features, t, y), out.eps)
    # diffusers folder round trip (diffusers' own timestep embedding kept)
    tr.save_pretrained(tmp_path / "m")
    again = load_dit_diffusers(tmp_path / "m")
    assert not again.original_timestep_embedding
    assert torch.equal(again(x, t, y).eps, out.eps)


def test_null_label_default_and_embed():
    model = DiTDenoiser(_tiny_diffusers())
    x, t, _ = _inputs()
    null = torch.full((3,), CLASSES, dtype=torch.long)
    assert torch.equal(model(x, t, None).eps, model(x, t, null).eps)
    assert model.embed(t, null).shape == (3, HIDDEN)


def test_eps_from_features_is_differentiable():
    model = DiTDenoiser(_tiny_diffusers())
    x, t, y = _inputs()
    f = model(x, t, y).features.clone().requires_grad_(True)
    model.eps_from_features(f, t, y).square().sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.transformer.parameters())


@pytest.mark.parametrize("guided_channels", [None, 3])
def test_cfg_matches_hand_computation(guided_channels):
    base = DiTDenoiser(_tiny_diffusers(out_channels=2 * IN_CH))
    w = 4.0
    cfg = CFGDenoiser(base, w, guided_channels=guided_channels)
    assert isinstance(cfg, EpsModel) and cfg.sample_shape == base.sample_shape
    x, t, y = _inputs()
    calls = []
    orig_call = DiTDenoiser.__call__

    def spy(self, *a):
        calls.append(a[0].shape[0])
        return orig_call(self, *a)

    DiTDenoiser.__call__ = spy
    try:
        out = cfg(x, t, y)
    finally:
        DiTDenoiser.__call__ = orig_call
    assert calls == [6]  # one batched call with both halves
    e_c = base(x, t, y).eps
    e_u = base(x, t, torch.full_like(y, CLASSES)).eps
    want = e_u + w * (e_c - e_u)
    if guided_channels == 3:
        want = torch.cat([want[:, :3], e_c[:, 3:]], dim=1)
    torch.testing.assert_close(out.eps, want, atol=1e-5, rtol=1e-5)
    assert out.features.shape == (3, 2, TOKENS, HIDDEN)
    torch.testing.assert_close(out.features[:, 0], base(x, t, y).features, atol=1e-5, rtol=1e-5)
    assert torch.equal(cfg.eps_from_features(out.features, t, y), out.eps)
    assert cfg.embed(t, y).shape == (3, 2, HIDDEN)


def test_cfg_rejects_bad_channels():
    with pytest.raises(ValueError):
        CFGDenoiser(DiTDenoiser(_tiny_diffusers()), 2.0, guided_channels=IN_CH + 1)


def test_vae_decode_and_images(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    z = torch.randn(2, 4, SIZE, SIZE)
    img = decode_latents(loaded, z)
    assert img.shape == (2, 3, 2 * SIZE, 2 * SIZE)  # two blocks -> one 2x upsampling
    with torch.no_grad():
        torch.testing.assert_close(img, vae.decode(z / 0.18215).sample)
    model = DiTDenoiser(_tiny_diffusers(), vae=loaded)
    u8 = model.to_images(z)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 2 * SIZE, 2 * SIZE, 3)
    # a DiTPipeline-style folder picks up vae/ automatically
    _tiny_diffusers().save_pretrained(tmp_path / "pipe" / "transformer")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    assert load_dit_diffusers(tmp_path / "pipe").vae is not None


def test_pixel_images_to_uint8():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    u8 = images_to_uint8(x)
    assert u8.shape == (1, 1, 5, 1)
    assert u8.flatten().tolist() == [0, 0, 128, 255, 255]


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="known names: .*mnist-dit"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="no such checkpoint file: .*missing.pt.*'Model weights'"):
        load_model(str(tmp_path / "missing.pt"))  # says what is missing and where checkpoints come from
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers DiT"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_model(str(tmp_path / "x.txt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read model checkpoint"):
        load_model(str(tmp_path / "bad.pt"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="original DiT"):
        load_model(str(tmp_path / "other.pt"))


def test_registry_gmm_presets_lazy():
    gmm = pytest.importorskip("specdit.models.gmm")
    name = next(iter(gmm.GMM_PRESETS))
    assert isinstance(load_model(name), EpsModel)


def test_builtin_mnist_dit_if_exported():
    from specdit.models.registry import BUILTIN_DITS

    if not (BUILTIN_DITS["mnist-dit"] / "config.json").is_file():
        pytest.skip("mnist-dit not exported yet")
    model = load_model("mnist-dit")
    assert model.sample_shape == (1, 32, 32) and model.num_classes == 10
    x = torch.randn(2, 1, 32, 32)
    out = model(x, torch.tensor([10, 900]), torch.tensor([3, 10]))
    assert out.eps.shape == (2, 1, 32, 32) and out.features.shape[:2] == (2, 64)
    assert torch.isfinite(out.eps).all()


# ------------------------------------------------------------------------------ mnist-dit trainer ----
def test_trainer_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    from specdit.training.dit_trainer import MnistDiTConfig, TrainConfig, load_mnist_tensor, train

    imgs, labels = load_mnist_tensor()
    assert imgs.shape == (5000, 1, 32, 32) and imgs.min() == -1 and imgs.max() == 1 and labels.max() == 9

    def cfg(out, steps):
        return TrainConfig(out=str(out), steps=steps, batch_size=4, warmup=0, min_lr_frac=1.0, threads=1,
                           ckpt_every=2, export_every=2, log_every=1,
                           model=MnistDiTConfig(hidden=16, depth=1, heads=2, patch_size=8))

    train(cfg(tmp_path / "a", 2))
    res = train(cfg(tmp_path / "a", 4))  # resumes at step 2
    train(cfg(tmp_path / "b", 4))
    assert res["step"] == 4
    wa = load_file(tmp_path / "a" / "export" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "export" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_dit_diffusers(tmp_path / "a" / "export").sample_shape == (1, 32, 32)


def test_min_snr_loss_weights_match_the_formula():
    from specdit.schedule import training_alphas_cumprod
    from specdit.training.dit_trainer import MnistDiTConfig, ddpm_loss

    torch.manual_seed(0)
    model = MnistDiTConfig(hidden=16, depth=1, heads=2, patch_size=8).build().eval()  # no label dropout
    x0, y = torch.rand(6, 1, 32, 32) * 2 - 1, torch.arange(6)
    ab = training_alphas_cumprod().float()
    sa, s1 = ab.sqrt(), (1 - ab).sqrt()
    plain = ddpm_loss(model, x0, y, sa, s1, torch.Generator().manual_seed(3))
    weighted = ddpm_loss(model, x0, y, sa, s1, torch.Generator().manual_seed(3), snr_gamma=5.0)
    # recompute by hand with the same draws: t then eps from the same generator
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model(sa[t].view(-1, 1, 1, 1) * x0 + s1[t].view(-1, 1, 1, 1) * eps, timestep=t, class_labels=y).sample
    per = (pred - eps).pow(2).flatten(1).mean(1)
    snr = ab[t] / (1 - ab[t])
    assert plain.item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((torch.minimum(snr, torch.tensor(5.0)) / snr * per).mean().item(), rel=1e-5)
    assert weighted.item() < plain.item()  # weights are <= 1


def test_trainer_init_from_starts_at_the_given_weights(tmp_path):
    from safetensors.torch import load_file

    from specdit.training.dit_trainer import MnistDiTConfig, TrainConfig, train

    def cfg(out, **kw):
        return TrainConfig(out=str(out), steps=2, batch_size=4, warmup=0, threads=1, log_every=1,
                           model=MnistDiTConfig(hidden=16, depth=1, heads=2, patch_size=8), **kw)

    train(cfg(tmp_path / "a"))
    train(cfg(tmp_path / "b", lr=0.0, init_from=str(tmp_path / "a" / "export")))  # lr 0: nothing moves
    wa = load_file(tmp_path / "a" / "export" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "export" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------- fidelity to facebookresearch/DiT's own code ----
# tests/data/dit_reference.safetensors holds outputs of DiT's models.py / diffusion package (commit in its
# metadata; how it was made: tests/data/README.md) for weights that tests/dit_seeded.py rebuilds here.
REFERENCE = Path(__file__).parent / "data" / "dit_reference.safetensors"
XL_ARCH = dict(hidden=1152, depth=2, patch=2, in_channels=4, input_size=8, num_classes=1000)  # seed 0
S_ARCH = dict(hidden=384, depth=2, patch=4, in_channels=4, input_size=16, num_classes=10, learn_sigma=False)  # 1
FLOAT32_REL = 1e-5  # acceptance bound on ||ours - DiT|| / ||DiT|| in float32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def dit_reference():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(REFERENCE), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(REFERENCE)), meta


@pytest.fixture(scope="module")
def seeded_checkpoints(tmp_path_factory):
    """Released-file layout (a flat state dict under DiT's key names) of the two seeded reference DiTs."""
    from tests.dit_seeded import dit_state_dict

    folder = tmp_path_factory.mktemp("seeded")
    torch.save(dit_state_dict(0, **XL_ARCH), folder / "xl.pt")
    torch.save(dit_state_dict(1, **S_ARCH), folder / "s.pt")
    return {"xl": folder / "xl.pt", "s": folder / "s.pt"}


@pytest.fixture(scope="module")
def xl_model(seeded_checkpoints):
    return load_dit_original(seeded_checkpoints["xl"])  # default options: heads from DiT's table


def test_xl_width_eps_equals_dit_forward(dit_reference, xl_model):
    ref, meta = dit_reference
    assert meta["dit_commit"] == "ed81ce2229091fd4ecc9a223645f95cf379d582b"
    cfg = xl_model.transformer.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (16, 72)  # not 18 heads of 64
    assert xl_model.learned_sigma and xl_model.has_null_class and xl_model.num_classes == 1000
    eps = xl_model(ref["xl_x"], ref["xl_t"], ref["xl_y"]).eps
    assert eps.shape == (4, 4, 8, 8)
    assert _rel(eps, ref["xl_out"][:, :4]) < FLOAT32_REL  # eps = DiT's first C channels


def test_xl_width_with_64_dim_heads_is_a_different_network(dit_reference, seeded_checkpoints):
    """Negative control: the old default (hidden // 64 = 18 heads) misses DiT's output by far."""
    ref, _ = dit_reference
    wrong = load_dit_original(seeded_checkpoints["xl"], num_heads=18)
    assert _rel(wrong(ref["xl_x"], ref["xl_t"], ref["xl_y"]).eps, ref["xl_out"][:, :4]) > 1e-2


def test_s_width_eps_equals_dit_forward(dit_reference, seeded_checkpoints):
    ref, _ = dit_reference
    model = load_model(str(seeded_checkpoints["s"]))  # through the registry, default options
    assert model.transformer.config.num_attention_heads == 6 and not model.learned_sigma
    assert _rel(model(ref["s_x"], ref["s_t"], ref["s_y"]).eps, ref["s_out"]) < FLOAT32_REL


def test_cfg_channels_3_equals_dit_forward_with_cfg(dit_reference, xl_model):
    ref, meta = dit_reference
    scale, tau = float(meta["cfg_scale"]), int(meta["cfg_tau"])
    t = torch.full((3,), tau)
    want = ref["cfg_out"][:, :4]  # first half of DiT's output, eps channels
    dit3 = CFGDenoiser(xl_model, scale, guided_channels=3)(ref["cfg_x"], t, ref["cfg_y"]).eps
    assert _rel(dit3, want) < FLOAT32_REL
    every = CFGDenoiser(xl_model, scale)(ref["cfg_x"], t, ref["cfg_y"]).eps  # negative control: guides channel 3
    assert _rel(every[:, :3], want[:, :3]) < FLOAT32_REL and _rel(every[:, 3], want[:, 3]) > 1e-2


def test_one_guided_step_equals_dit_forward_with_cfg_and_fixed_variance_kernel(dit_reference, seeded_checkpoints):
    """The library path (load, guide with cfg_channels=3, schedule, kernel) against DiT's SpacedDiffusion
    (``create_diffusion(S, learn_sigma=False, sigma_small=True)``: the fixed posterior variance) taking
    ``p_sample`` at respaced index i on ``forward_with_cfg``'s eps; our state index is k = i + 1."""
    from specdit.api import SamplerConfig, guided, parse_cfg_channels
    from specdit.samplers.common import call_model
    from specdit.schedule import Schedule

    ref, meta = dit_reference
    config = SamplerConfig(sampler="ddpm", steps=int(meta["cfg_steps"]), cfg_scale=float(meta["cfg_scale"]),
                           cfg_channels=parse_cfg_channels("3")).validate()
    target = guided(load_model(str(seeded_checkpoints["xl"])), config.cfg_scale, config.cfg_channels)
    schedule = Schedule.create(config.steps, config.eta)
    k = int(meta["cfg_index"]) + 1
    assert int(schedule.timesteps[k]) == int(meta["cfg_tau"])
    x = ref["cfg_x"].double()
    kk = torch.full((3,), k)
    eps = call_model(target, x, schedule.timesteps[kk], ref["cfg_y"]).eps
    mean = schedule.step_mean(x, eps, kk)
    assert _rel(mean, ref["cfg_mean"]) < FLOAT32_REL
    var = ref["cfg_log_variance"].double().exp()
    assert torch.allclose(var, torch.full_like(var, float(schedule.sigma[k]) ** 2), rtol=1e-5, atol=0)
    step = mean + schedule.sigma[k] * ref["cfg_noise"].double()
    assert _rel(step, ref["cfg_sample"]) < FLOAT32_REL
    # negative control: guiding every channel moves the step away from DiT's
    every = call_model(guided(target.model, config.cfg_scale), x, schedule.timesteps[kk], ref["cfg_y"]).eps
    assert _rel(schedule.step_mean(x, every, kk), ref["cfg_mean"]) > 1e-4


def _shape_only(hidden, patch, depth=2, in_ch=4, tokens=16, rows=1001, out_ch=8):
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731 - shapes are all that is read
    sd = {"x_embedder.proj.weight": meta(hidden, in_ch, patch, patch), "pos_embed": meta(1, tokens, hidden),
          "final_layer.linear.weight": meta(patch * patch * out_ch, hidden),
          "y_embedder.embedding_table.weight": meta(rows, hidden)}
    sd.update({f"blocks.{i}.attn.qkv.weight": meta(3 * hidden, hidden) for i in range(depth)})
    return sd


@pytest.mark.parametrize("size,hidden,heads,depth", [("S", 384, 6, 12), ("B", 768, 12, 12), ("L", 1024, 16, 24),
                                                     ("XL", 1152, 16, 28)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_architecture_inferred_from_dit_table(size, hidden, heads, depth, patch):
    from specdit.models.dit import original_dit_config, original_dit_name

    config = original_dit_config(_shape_only(hidden, patch, depth))
    assert config["num_attention_heads"] == heads and config["num_layers"] == depth
    assert config["patch_size"] == patch and config["num_embeds_ada_norm"] == 1000
    assert original_dit_name(config) == f"DiT-{size}/{patch}"
    assert original_dit_name(original_dit_config(_shape_only(hidden, patch, 2))) == f"DiT-{size}/{patch} (depth 2)"


def test_unplaceable_width_is_refused_naming_num_heads():
    from specdit.models.dit import original_dit_config

    with pytest.raises(ValueError, match="pass --num-heads") as e:
        original_dit_config(_shape_only(320, 2))
    assert "\n" not in str(e.value)
    assert original_dit_config(_shape_only(320, 2), num_heads=5)["attention_head_dim"] == 64
    with pytest.raises(ValueError, match="not divisible"):
        original_dit_config(_shape_only(320, 2), num_heads=7)


# ----------------------------------------------------------- DiT train.py checkpoints, unpickling ----
TRAIN_ARCH = dict(hidden=384, depth=1, patch=4, in_channels=4, input_size=8, num_classes=10)


def _train_checkpoint(path, args_model="DiT-S/4", num_classes=10, extra=None, null_class=True):
    """A checkpoint in the layout of DiT's train.py: {"model", "ema", "opt", "args"}, args a Namespace."""
    import argparse

    from tests.dit_seeded import dit_state_dict

    model = dit_state_dict(2, null_class=null_class, **TRAIN_ARCH)
    ema = dit_state_dict(3, null_class=null_class, **TRAIN_ARCH)
    params = [torch.nn.Parameter(v.clone()) for v in list(model.values())[:3]]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    sum(p.sum() for p in params).backward()
    opt.step()
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model=args_model,
                              image_size=64, num_classes=num_classes, epochs=1400, global_batch_size=256,
                              global_seed=0, vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    ckpt = {"model": model, "ema": ema, "opt": opt.state_dict(), "args": args, **(extra or {})}
    torch.save(ckpt, path)
    return model, ema


def test_train_py_checkpoint_loads_ema_by_default(tmp_path):
    model_sd, ema_sd = _train_checkpoint(tmp_path / "0050000.pt")
    torch.save(ema_sd, tmp_path / "ema.pt")
    torch.save(model_sd, tmp_path / "model.pt")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 900]), torch.tensor([3, 10])

    def eps(path, **kw):
        return load_model(str(path), **kw)(x, t, y).eps

    default = eps(tmp_path / "0050000.pt")
    assert torch.equal(default, eps(tmp_path / "ema.pt"))
    assert torch.equal(eps(tmp_path / "0050000.pt", weights="ema"), default)
    assert torch.equal(eps(tmp_path / "0050000.pt", weights="model"), eps(tmp_path / "model.pt"))
    assert not torch.equal(eps(tmp_path / "model.pt"), default)
    with pytest.raises(ValueError, match="no 'model' weights"):
        load_model(str(tmp_path / "ema.pt"), weights="model")
    with pytest.raises(ValueError, match="weights must be 'ema' or 'model'"):
        load_model(str(tmp_path / "0050000.pt"), weights="best")


def test_train_py_args_name_the_architecture_and_the_classes(tmp_path):
    from specdit.models.registry import guidance_refusal

    _train_checkpoint(tmp_path / "bad.pt", args_model="DiT-B/4")
    with pytest.raises(ValueError, match="args name DiT-B/4 but the weights have hidden size 384"):
        load_model(str(tmp_path / "bad.pt"))
    _train_checkpoint(tmp_path / "badn.pt", num_classes=1000)
    with pytest.raises(ValueError, match="num_classes=1000 but the class table has 11 rows"):
        load_model(str(tmp_path / "badn.pt"))
    # a DiT trained without class dropout has no null-class row: it loads, but cannot be guided
    _train_checkpoint(tmp_path / "nonull.pt", null_class=False)
    model = load_model(str(tmp_path / "nonull.pt"))
    assert model.num_classes == 10 and not model.has_null_class
    assert guidance_refusal(str(tmp_path / "nonull.pt")) is not None
    with pytest.raises(ValueError, match="null class"):
        CFGDenoiser(model, 4.0)
    _train_checkpoint(tmp_path / "ok.pt")
    assert guidance_refusal(str(tmp_path / "ok.pt")) is None


class NotAllowed:  # pickled by reference (tests.test_dit_models.NotAllowed): must never be unpickled
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize("extra,name", [
    ({"sched": functools.partial(int, base=2)}, "functools.partial"),
    ({"hook": NotAllowed()}, "pickled print"),
    ({"cls": NotAllowed}, "tests.test_dit_models.NotAllowed"),
])
def test_other_pickled_objects_are_refused_in_one_line(tmp_path, capsys, extra, name):
    _train_checkpoint(tmp_path / "evil.pt", extra=extra)
    with pytest.raises(ValueError) as e:
        load_model(str(tmp_path / "evil.pt"))
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "refusing to unpickle" in msg
    assert "unpickled!" not in capsys.readouterr().out


def test_plain_containers_load_and_broken_files_are_one_line(tmp_path):
    from collections import OrderedDict

    from tests.dit_seeded import dit_state_dict

    torch.save(OrderedDict(dit_state_dict(2, **TRAIN_ARCH)), tmp_path / "ordered.pt")  # allowed by weights_only
    assert load_model(str(tmp_path / "ordered.pt")).num_classes == 10
    (tmp_path / "empty.pt").write_bytes(b"")
    good = (tmp_path / "ordered.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk" * 10)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for name, needle in [("empty.pt", "is empty"), ("cut.pt", "cannot read model checkpoint"),
                         ("junk.pt", "cannot read model checkpoint"), ("list.pt", "not a state dict")]:
        with pytest.raises(ValueError, match=needle) as e:
            load_model(str(tmp_path / name))
        assert "\n" not in str(e.value), name
