"""Image tokenizers: pixel (palette), VQ-VAE, hybrid (and patch) behind ViTConfig.tokenizer."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from vitlens import create_model
from vitlens.cli import main as cli_main
from vitlens.io import load_checkpoint, save_checkpoint
from vitlens.models.resnet import BasicBlock
from vitlens.models.tokenizers import (
    VQVAE,
    HybridEmbed,
    PixelTokenizer,
    VQTokenizer,
    VQVAEConfig,
    assign_palette,
    fit_palette,
    load_palette,
    load_vqvae,
    psnr,
    save_palette,
    save_vqvae,
    uniform_palette,
)

TINY_VQ = dict(hidden=32, res_hidden=16, num_res_blocks=1, code_dim=16, codebook_size=64)


@pytest.fixture(scope="module")
def mini_images() -> torch.Tensor:
    """uint8 (N, 3, 32, 32): the embedded CIFAR-10 subset (2,000 train images)."""
    from vitlens.data import build_dataset

    return build_dataset("cifar10-mini", "train").images


@pytest.fixture(scope="module")
def vq_file(tmp_path_factory, mini_images) -> str:
    """A tiny VQ-VAE, briefly trained so its codebook is data-initialised, saved as a tokenizer file."""
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(**TINY_VQ))
    opt = torch.optim.AdamW(vq.parameters(), 2e-3)
    for i in range(5):
        x = mini_images[i * 64 : (i + 1) * 64].float() / 255
        recon, _, vq_loss, _ = vq(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("vq") / "tokenizer.safetensors"
    save_vqvae(path, vq)
    return str(path)


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    from vitlens.data import CIFAR10_MEAN, CIFAR10_STD

    x = images_uint8.float() / 255
    return (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)


def build(tokenizer: str, vq_file: str | None = None, **args):
    if tokenizer == "vq":
        args.setdefault("checkpoint", vq_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uniform-palette fallback warns
        return create_model("vit_micro_patch4_32", tokenizer=tokenizer, tokenizer_args=args)


# -- every tokenizer: shapes, attributes, determinism, save/load ----------------------------
EXPECTED = {  # tokenizer -> (num tokens, grid, input pixels per token)
    "patch": (64, (8, 8), (4, 4)),
    "pixel": (256, (16, 16), (2, 2)),
    "vq": (64, (8, 8), (4, 4)),
    "hybrid": (64, (8, 8), (4, 4)),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tokenizer_shapes_and_attributes(name, vq_file, mini_images):
    model = build(name, vq_file).eval()
    tok = model.patch_embed
    n, grid, patch = EXPECTED[name]
    assert (tok.num_patches, tuple(tok.grid_size), tuple(tok.patch_size), tuple(tok.img_size)) == (
        n,
        grid,
        patch,
        (32, 32),
    )
    x = normalise(mini_images[:3])
    assert tok(x).shape == (3, n, 128)
    assert model.forward_features(x).shape == (3, 1 + n, 128)  # [CLS] + tokens
    assert model.pos_embed.shape == (1, 1 + n, 128)
    assert model(x).shape == (3, 10)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tokenizer_deterministic_and_state_dict_roundtrip(name, vq_file, mini_images, tmp_path):
    torch.manual_seed(1)
    a = build(name, vq_file).eval()
    torch.manual_seed(1)
    b = build(name, vq_file).eval()
    x = normalise(mini_images[:4])
    assert torch.equal(a(x), a(x))  # same input, same output
    assert torch.equal(a(x), b(x))  # same seed, same model
    if name == "pixel":  # the palette travels in the state dict (persistent buffer)
        a.patch_embed.set_palette(uniform_palette(512) + torch.rand(512, 3) * 10)
    save_checkpoint(tmp_path / "m.safetensors", a.state_dict(), meta={"model": "vit_micro_patch4_32"})
    torch.manual_seed(2)
    c = build(name, vq_file).eval()
    assert not torch.equal(a(x), c(x))
    state, _, _ = load_checkpoint(tmp_path / "m.safetensors")
    c.load_state_dict(state)
    assert torch.equal(a(x), c(x))


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="patch, pixel, vq, hybrid"):
        create_model("vit_micro_patch4_32", tokenizer="pixels")


def test_registered_models():
    m = build("pixel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = create_model("vit_micro_pixel16_32")
    assert (
        named.cfg.tokenizer == "pixel" and named.patch_embed.num_patches == m.patch_embed.num_patches == 256
    )
    assert create_model("vit_micro_hybrid_32").patch_embed.grid_size == (8, 8)


# -- pixel tokenizer ---------------------------------------------------------------------------
def test_palette_assignment_equals_brute_force_nearest_colour():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3000, 3, generator=g) * 255
    palette = torch.rand(97, 3, generator=g) * 255
    brute = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(-1).argmin(1)  # (N, K) distances
    assert torch.equal(assign_palette(pixels, palette, chunk=512), brute)
    # integer pixels against a uniform palette: exactly on bin boundaries nothing is ambiguous either
    ints = torch.randint(0, 256, (2000, 3), generator=g).float()
    pal = uniform_palette(512)
    assert torch.equal(assign_palette(ints, pal), ((ints[:, None] - pal[None]) ** 2).sum(-1).argmin(1))
    levels = (ints // 32).long()  # 8 levels a channel: the uniform palette is plain 3-bit quantisation
    assert torch.equal(assign_palette(ints, pal), levels[:, 0] * 64 + levels[:, 1] * 8 + levels[:, 2])


def test_pixel_tokenizer_matches_brute_force_on_images(mini_images):
    palette = fit_palette(mini_images[:20], k=64, iters=3)
    tok = PixelTokenizer(32, 16, palette, resolution=8)
    x = mini_images[:5]
    idx = tok.tokenize(normalise(x))  # (B, 8, 8)
    small = F.avg_pool2d(x.float(), 4).permute(0, 2, 3, 1).reshape(-1, 3)  # 4x4 box averages, 0..255
    brute = ((small[:, None] - palette[None]) ** 2).sum(-1).argmin(1).view(5, 8, 8)
    # un-normalising costs float rounding: allow only assignments that are genuine near-ties
    d = ((small[:, None] - palette[None]) ** 2).sum(-1)
    mismatch = idx.flatten() != brute.flatten()
    gap = d[mismatch, idx.flatten()[mismatch]] - d[mismatch, brute.flatten()[mismatch]]
    assert mismatch.float().mean() < 0.01 and (gap.abs() < 1e-2).all()
    assert idx.shape == (5, 8, 8) and tok.decode(idx).shape == (5, 3, 8, 8)


def test_fit_palette_recovers_separated_colours():
    centres = torch.tensor([[10.0, 20, 30], [200, 40, 40], [30, 220, 60], [240, 240, 250]])
    g = torch.Generator().manual_seed(0)
    pix = centres[torch.randint(0, 4, (5000,), generator=g)] + torch.randn(5000, 3, generator=g) * 3
    imgs = pix.round().clamp(0, 255).to(torch.uint8).view(50, 10, 10, 3)  # (N, H, W, 3)
    fitted = fit_palette(imgs, k=4, seed=0, iters=15)
    err = torch.cdist(fitted, centres).min(0).values  # every true colour has a centroid next to it
    assert err.max() < 1.0, fitted
    assert torch.allclose(fit_palette(imgs, k=4, seed=0, iters=15), fitted)  # deterministic given the seed


def test_palette_file_and_errors(tmp_path, mini_images):
    pal = fit_palette(mini_images[:20], k=8, iters=2)
    save_palette(tmp_path / "p.safetensors", pal)
    assert torch.equal(load_palette(tmp_path / "p.safetensors"), pal)
    m = build("pixel", palette=str(tmp_path / "p.safetensors"), resolution=8)
    assert torch.equal(m.patch_embed.palette, pal) and m.patch_embed.num_patches == 64
    with pytest.raises(ValueError, match="cube number"):
        uniform_palette(500)
    with pytest.raises(ValueError, match="uint8"):
        fit_palette(torch.rand(2, 3, 4, 4), k=2)
    with pytest.warns(UserWarning, match="uniform 512-colour"):
        create_model("vit_micro_patch4_32", tokenizer="pixel")


# -- VQ-VAE --------------------------------------------------------------------------------------
def test_vq_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    for ema in (True, False):
        vq = VQVAE(VQVAEConfig(**TINY_VQ, ema=ema))
        vq.train()(x)  # the first training batch initialises the codebook from encoder outputs
        vq.eval()  # no EMA update / restart below, so the codebook stays what zq was read from
        z = vq.encoder(x - 0.5)
        z.retain_grad()
        zq, idx, _, _ = vq.quantizer(z)
        zq.retain_grad()
        F.mse_loss(vq.decoder(zq) + 0.5, x).backward()  # reconstruction loss only
        assert torch.equal(z.grad, zq.grad)  # straight-through: dL/dz = dL/dzq
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vq.encoder.parameters())
        # the forward value is the code vector (up to the rounding of z + (zq - z))
        assert torch.allclose(zq, vq.quantizer.codebook[idx].permute(0, 3, 1, 2), atol=1e-6)
        assert (zq - z).abs().max() > 1e-3  # and it is not z itself
        if not ema:  # gradient codebook: the codebook loss reaches the codes
            vq.zero_grad()
            _, _, vq_loss, _ = vq.quantizer(vq.encoder(x - 0.5))
            vq_loss.backward()
            assert vq.quantizer.codebook.grad.abs().sum() > 0


def test_ema_update_moves_codes_to_cluster_means():
    cfg = VQVAEConfig(**{**TINY_VQ, "codebook_size": 4, "code_dim": 2}, decay=0.0, dead_threshold=0.0)
    q = VQVAE(cfg).quantizer.train()
    q.initialized.fill_(True)
    q.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    z = torch.tensor([[1.0, 1], [-1, 0], [9, 1], [11, -1], [0, 9], [1, 12]])  # 2 near each of codes 0-2
    _, idx, _, _ = q(z.t().reshape(1, 2, 6, 1))  # (B, d, h, w) whose 6 positions are the rows of z
    assert idx.flatten().tolist() == [0, 0, 1, 1, 2, 2]
    expected = torch.stack([z[0:2].mean(0), z[2:4].mean(0), z[4:6].mean(0)])
    assert torch.allclose(q.codebook[:3], expected, atol=1e-4)


def test_dead_codes_restart_at_encoder_outputs():
    cfg = VQVAEConfig(**{**TINY_VQ, "codebook_size": 16, "code_dim": 4}, decay=0.5)
    q = VQVAE(cfg).quantizer.train()
    q.initialized.fill_(True)
    q.codebook.copy_(torch.full((16, 4), 100.0))
    q.codebook[0] = 0.0  # every input picks code 0; the other 15 are dead after one batch
    q.cluster_size.fill_(0.0)
    z = torch.randn(1, 4, 8, 8)
    q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    moved = q.codebook[1:]
    dist = torch.cdist(moved, flat, compute_mode="donot_use_mm_for_euclid_dist")
    assert (dist.min(1).values < 1e-6).all()  # each restarted code is an encoder output
    _, idx, _, stats = q(z)
    assert stats["codes_used"] > 1


def test_reconstruction_improves_with_training(mini_images):
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(**TINY_VQ))
    test = mini_images[-64:].float() / 255  # held out: training uses the first 1,920 images
    opt = torch.optim.AdamW(vq.parameters(), 3e-3)

    @torch.no_grad()
    def test_psnr() -> float:
        return psnr(vq.eval()(test)[0], test).mean().item()

    curve = [test_psnr()]
    for step in range(60):
        x = mini_images[step * 32 : (step + 1) * 32].float() / 255
        recon, _, vq_loss, _ = vq.train()(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in (20, 60):
            curve.append(test_psnr())
    assert curve[1] > curve[0] + 1 and curve[2] > curve[1] + 2 and curve[2] > 15, curve


def test_vq_file_roundtrip_and_frozen_vit_tokenizer(vq_file, mini_images):
    vq, meta = load_vqvae(vq_file)
    again, _ = load_vqvae(vq_file)
    x = mini_images[:4].float() / 255
    assert meta["kind"] == "vqvae" and torch.equal(vq.encode(x), again.encode(x))
    assert torch.equal(vq.decode_indices(vq.encode(x)), again.decode_indices(again.encode(x)))

    model = build("vq", vq_file).train()
    tok = model.patch_embed
    assert isinstance(tok, VQTokenizer)
    assert torch.equal(tok.tokenize(normalise(mini_images[:4])), vq.encode(x))  # un-normalises internally
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("patch_embed")}
    assert trainable == {"patch_embed.embed.weight"}
    assert not tok.encoder.training and not tok.quantizer.training
    code_before = tok.quantizer.codebook.clone()
    model(normalise(mini_images[:8])).sum().backward()
    assert torch.equal(tok.quantizer.codebook, code_before)  # no EMA update inside the ViT
    assert tok.embed.weight.grad is not None and tok.encoder.net[0].weight.grad is None


def test_vq_errors(tmp_path, mini_images):
    with pytest.raises(FileNotFoundError):
        build("vq", checkpoint=str(tmp_path / "missing.safetensors"))
    save_palette(tmp_path / "p.safetensors", fit_palette(mini_images[:10], k=4, iters=1))
    with pytest.raises(ValueError, match="not a VQ-VAE"):
        load_vqvae(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="power of 2"):
        VQVAEConfig(downsample=3)
    with pytest.warns(UserWarning, match="random"):
        create_model("vit_micro_patch4_32", tokenizer="vq")


# -- hybrid ------------------------------------------------------------------------------------
def test_hybrid_reuses_resnet_and_grid_is_configurable():
    m = build("hybrid")
    tok = m.patch_embed
    assert isinstance(tok, HybridEmbed) and isinstance(tok.backbone.layer1[0], BasicBlock)
    assert build("hybrid", grid=4).patch_embed.grid_size == (4, 4)
    two = build("hybrid", layers=(1, 1), widths=(16, 32)).patch_embed
    assert two.grid_size == (16, 16) and two.patch_size == (2, 2)
    # same features as the ResNet it is built from
    x = torch.randn(2, 3, 32, 32)
    tok.eval()
    feats = tok.backbone.forward_features(x)
    assert torch.allclose(tok(x), tok.proj(feats).flatten(2).transpose(1, 2))
    m.set_image_size(48)  # convolutions take any size: the grid grows, the ViT resamples positions
    assert tok.grid_size == (12, 12) and m(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="cannot be cut"):
        build("hybrid", grid=3)
    with pytest.raises(ValueError, match="not divisible"):
        build("hybrid", patch=3)


# -- the command -----------------------------------------------------------------------------
def test_eval_subset_spans_the_split():
    from vitlens.train.tokenizer import spread

    labels = torch.arange(10).repeat_interleave(100)  # a test split stored class by class
    assert spread(labels, 50).unique().tolist() == list(range(10))
    assert torch.equal(spread(labels, None), labels)


def test_train_tokenizer_cli(tmp_path, capsys):
    out = tmp_path / "vq"
    rc = cli_main(
        [
            "train-tokenizer",
            "--data",
            "cifar10-mini",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--fraction",
            "0.25",
            "--hidden",
            "16",
            "--res-hidden",
            "8",
            "--num-res-blocks",
            "1",
            "--code-dim",
            "8",
            "--codebook-size",
            "32",
            "--eval-images",
            "100",
            "--no-progress",
        ]
    )
    assert rc == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"test_psnr", "test_codebook_usage", "test_perplexity", "train_psnr"} <= set(rec)
    assert 0 < rec["test_codebook_usage"] <= 100 and 1 <= rec["test_perplexity"] <= 32
    assert (out / "recon.png").is_file()
    vq, meta = load_vqvae(out / "tokenizer.safetensors")
    assert vq.cfg.codebook_size == 32 and meta["metrics"]["epoch"] == 1
    model = create_model("vit_micro_vq_32", tokenizer_args={"checkpoint": str(out / "tokenizer.safetensors")})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    rc = cli_main(
        [
            "train-tokenizer",
            "--kind",
            "palette",
            "--data",
            "cifar10-mini",
            "--out",
            str(tmp_path / "p"),
            "--k",
            "8",
            "--palette-iters",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0 and load_palette(tmp_path / "p" / "palette.safetensors").shape == (8, 3)
    capsys.readouterr()
    assert (
        cli_main(
            [
                "train-tokenizer",
                "--kind",
                "vq",
                "--data",
                "cifar10-mini",
                "--out",
                str(tmp_path / "x"),
                "--downsample",
                "3",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "power of 2" in capsys.readouterr().err
