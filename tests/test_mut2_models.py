"""Round-2 mutation gaps in the model zoo (vit, resnet, resnet_fast, bert, gpt, seq2seq; the image
tokenizers are in test_mut2_models_tokenizers.py): whole error messages (the UX contract), seeded
randomness that must not leak to the global RNG, dropout and buffer plumbing, documented defaults.

Every model here is the smallest that shows the behaviour, so each test runs in well under a second.
"""

from __future__ import annotations

import pytest
import torch
from _models import raises_exactly as _raises
from _models import tiny_vit as _tiny_vit
from torch import nn

from vitlens.errors import ModelError
from vitlens.layers.attention import Attention
from vitlens.models.bert import Bert, BertConfig, mask_tokens
from vitlens.models.gpt import GPT, GPTConfig
from vitlens.models.resnet import BasicBlock, ResNet, ResNetConfig
from vitlens.models.resnet_fast import ResNetFast, ResNetFastConfig
from vitlens.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from vitlens.models.tokenizers.palette import uniform_palette
from vitlens.models.tokenizers.vqvae import VQVAEConfig
from vitlens.models.vit import ViTConfig

# ----------------------------------------------------------------------------- config messages
CONFIG_ERRORS = [
    (lambda: ViTConfig(pool="max"), "pool must be 'cls', 'gap' or 'cls+gap', got 'max'"),
    (lambda: ViTConfig(act="relu"), "act must be one of gelu, quick_gelu, got 'relu'"),
    (lambda: ViTConfig(pos_embed="rope"), "pos_embed must be 'learned', 'sincos2d' or 'none', got 'rope'"),
    (
        lambda: ViTConfig(class_token=False),
        "pool='cls' needs class_token=True; use pool='gap' for a model without [CLS]",
    ),
    (
        lambda: ViTConfig(distilled=True, pool="gap", class_token=True),
        "distilled=True (DeiT) needs pool='cls' and no registers",
    ),
    (
        lambda: ViTConfig(distilled=True, num_registers=2),
        "distilled=True (DeiT) needs pool='cls' and no registers",
    ),
    (lambda: ResNetConfig(block="wide"), "block must be 'basic' or 'bottleneck', got 'wide'"),
    (lambda: ResNetConfig(stem="tiny"), "stem must be 'imagenet' or 'cifar', got 'tiny'"),
    (
        lambda: ResNetConfig(layers=(1, 1), widths=(8,)),
        "layers (1, 1) and widths (8,) must have the same length",
    ),
    (lambda: BasicBlock(8, 8, base_width=128), "base_width (wide ResNets) needs block='bottleneck'"),
    (
        lambda: ResNetFastConfig(widths=(8, 16)),
        "widths (8, 16) must give the prep width plus one per stage (3 stages, from `residual`)",
    ),
    (lambda: ResNetFastConfig(act="tanh"), "act must be one of relu, gelu, celu, got 'tanh'"),
    (lambda: GPTConfig(n_embd=10, n_head=4), "n_embd 10 is not divisible by n_head 4"),
    (
        lambda: Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=12),
        "share_src_tgt_embed needs one joint vocabulary (src_vocab_size == tgt_vocab_size); "
        "set share_src_tgt_embed=False for separate vocabularies",
    ),
    (lambda: VQVAEConfig(downsample=3), "downsample must be a power of 2 (1, 2, 4, 8, ...), got 3"),
    (lambda: VQVAEConfig(codebook_size=1), "codebook_size must be at least 2, got 1"),
    (
        lambda: uniform_palette(10),
        "a uniform RGB palette needs a cube number of colours (8, 64, 512, ...), got k=10",
    ),
]


@pytest.mark.parametrize("make, message", CONFIG_ERRORS, ids=[m for _, m in CONFIG_ERRORS])
def test_config_errors_say_the_problem_in_full(make, message):
    _raises(ModelError, message, make)


def test_valid_configs_pass_their_checks():
    # The boundary values the checks must accept.
    ViTConfig(pool="gap", class_token=False)
    ViTConfig(pool="cls+gap")
    ViTConfig(distilled=True)
    ResNetConfig(block="bottleneck", stem="cifar", layers=[1], widths=[8])
    assert ResNetConfig(layers=[1, 2], widths=[8, 16]).layers == (1, 2)  # lists become tuples
    assert ResNetFastConfig(widths=[8, 16], residual=[1]).residual == (True,)
    GPTConfig(n_embd=12, n_head=4)
    Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=12, share_src_tgt_embed=False)
    VQVAEConfig(codebook_size=2, downsample=1)


# ----------------------------------------------------------------------------- input messages
def test_model_input_errors_in_full():
    vit = _tiny_vit()
    _raises(
        ModelError,
        "VisionTransformer expects a batch of images (B, 3, H, W), got shape (3, 8, 8); add the batch "
        "dimension with x.unsqueeze(0)",
        vit,
        torch.zeros(3, 8, 8),
    )
    _raises(
        ModelError,
        "VisionTransformer was built for 3-channel images, got 1-channel images (shape (2, 1, 8, 8)); "
        "convert the images (e.g. grayscale to RGB) or build the model with in_chans=1",
        vit,
        torch.zeros(2, 1, 8, 8),
    )
    _raises(
        ModelError,
        "VisionTransformer was built for 8x8 images, got 12x12; resize the images to 8x8 or call "
        "model.set_image_size((12, 12)) to adapt the model (its position embeddings are resampled)",
        vit,
        torch.zeros(1, 3, 12, 12),
    )
    resnet = ResNet(ResNetConfig(layers=(1,), widths=(4,), stem="cifar", num_classes=2))
    _raises(
        ModelError,
        "ResNet was built for 3-channel images, got 2-channel images (shape (1, 2, 8, 8)); convert the "
        "images (e.g. grayscale to RGB) or build the model with in_chans=2",
        resnet,
        torch.zeros(1, 2, 8, 8),
    )
    _raises(
        ModelError,
        "ResNet expects a batch of images (B, 3, H, W), got shape (3, 8, 8); add the batch dimension with "
        "x.unsqueeze(0)",
        resnet,
        torch.zeros(3, 8, 8),
    )
    fast = ResNetFast(ResNetFastConfig(widths=(4, 8), residual=(False,), in_chans=1))
    _raises(
        ModelError,
        "ResNetFast was built for 1-channel images, got 3-channel images (shape (1, 3, 8, 8)); convert the "
        "images (e.g. grayscale to RGB) or build the model with in_chans=3",
        fast,
        torch.zeros(1, 3, 8, 8),
    )
    bert = Bert(BertConfig(vocab_size=11, max_len=4, depth=1, num_heads=2, embed_dim=8, dropout=0.0))
    _raises(
        ModelError,
        "Bert expects token ids of shape (B, T), got (5,); add the batch dimension with ids.unsqueeze(0)",
        bert,
        torch.ones(5, dtype=torch.long),
    )
    _raises(
        ModelError,
        "sequence of 5 tokens exceeds the max_len of Bert (4, its learned position table); truncate it to 4 "
        "tokens",
        bert,
        torch.ones(1, 5, dtype=torch.long),
    )
    gpt = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, n_embd=8, dropout=0.0))
    _raises(
        ModelError,
        "GPT expects token ids of shape (B, T), got (5,); add the batch dimension with ids.unsqueeze(0)",
        gpt,
        torch.ones(5, dtype=torch.long),
    )
    _raises(
        ModelError,
        "sequence of 5 tokens exceeds the context of GPT (4 tokens); crop it to the last 4 tokens "
        "(generate() does this itself)",
        gpt,
        torch.ones(1, 5, dtype=torch.long),
    )
    _raises(
        ModelError,
        "kv_cache needs one dict per block (1), got 2; start it with model.new_cache()",
        gpt.forward_features,
        torch.ones(1, 2, dtype=torch.long),
        kv_cache=[{}, {}],
    )
    _raises(
        ValueError,
        "temperature must be >= 0 (0 = greedy), got -0.5",
        gpt.generate,
        torch.ones(1, 1, dtype=torch.long),
        2,
        temperature=-0.5,
    )
    s2s = Seq2SeqTransformer(
        Seq2SeqConfig(
            src_vocab_size=11,
            tgt_vocab_size=11,
            d_model=8,
            num_heads=2,
            enc_layers=1,
            dec_layers=1,
            mlp_dim=8,
            max_len=4,
            dropout=0.0,
        )
    )
    _raises(
        ValueError,
        "sequence of 5 tokens exceeds max_len 4; truncate the input or build the model with a larger max_len "
        "(its sinusoidal positions need no training)",
        s2s.encode,
        torch.ones(1, 5, dtype=torch.long),
    )
    memory = s2s.encode(torch.ones(1, 2, dtype=torch.long))
    _raises(
        ValueError,
        "sequence of 5 tokens exceeds max_len 4; truncate the input or build the model with a larger max_len "
        "(its sinusoidal positions need no training)",
        s2s.decode,
        torch.ones(1, 2, dtype=torch.long),
        memory,
        start_pos=3,
    )
    s2s.decode(torch.ones(1, 1, dtype=torch.long), memory, start_pos=3)  # exactly max_len is fine


# ----------------------------------------------------------------------------- seeded randomness
def test_mask_tokens_with_a_generator_ignores_the_global_rng():
    ids = torch.randint(4, 40, (8, 64), generator=torch.Generator().manual_seed(3))
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # another user of the global RNG must not change the masking
        outs.append(
            mask_tokens(
                ids, vocab_size=40, mask_id=1, random_low=4, generator=torch.Generator().manual_seed(0)
            )
        )
    (in1, lab1), (in2, lab2) = outs
    assert torch.equal(in1, in2) and torch.equal(lab1, lab2)
    # and the three kinds of corruption all happen (so each of the draws is exercised)
    chosen = lab1 != -100
    assert (in1[chosen] == 1).any() and (in1[chosen] == ids[chosen]).any()
    assert ((in1 != 1) & (in1 != ids)).any()


def test_mask_tokens_follows_the_input_device_not_the_default_one():
    ids = torch.randint(4, 40, (4, 32))
    want = mask_tokens(ids, vocab_size=40, mask_id=1, generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):  # a user who set a default device and passes CPU ids
        got = mask_tokens(ids, vocab_size=40, mask_id=1, generator=torch.Generator().manual_seed(0))
    assert got[0].device.type == "cpu" and got[1].device.type == "cpu"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- dropout plumbing
def _dropout_rates(model: nn.Module) -> list[float]:
    """Every dropout probability the model applies: nn.Dropout modules and attention-probability dropout."""
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [m.attn_drop for m in model.modules() if isinstance(m, Attention)]
    return rates


def test_dropout_setting_reaches_every_dropout_site():
    # BERT / GPT / the Transformer: one `dropout` for embeddings, attention probabilities, both
    # residual branches and (BERT) the classifier - as HF's hidden and attention dropout both set to it.
    bert = Bert(BertConfig(vocab_size=11, max_len=8, depth=2, num_heads=2, embed_dim=8, dropout=0.3))
    # embeddings + per block (attention probs, attn proj, mlp x2) + head
    assert _dropout_rates(bert) == pytest.approx([0.3] * (1 + 2 * 4 + 1))
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.3))
    assert _dropout_rates(gpt) == pytest.approx([0.3] * (1 + 2 * 4))
    s2s = Seq2SeqTransformer(
        Seq2SeqConfig(
            src_vocab_size=11,
            tgt_vocab_size=11,
            d_model=8,
            num_heads=2,
            enc_layers=1,
            dec_layers=1,
            mlp_dim=8,
            dropout=0.3,
        )
    )
    # embeddings + encoder block (4) + decoder block (self-attn 2, cross-attn 2, mlp 2)
    assert _dropout_rates(s2s) == pytest.approx([0.3] * (1 + 4 + 6))
    vit = _tiny_vit(depth=2, drop_rate=0.25, attn_drop_rate=0.5)
    attn = [m.attn_drop for m in vit.modules() if isinstance(m, Attention)]
    assert attn == [0.5, 0.5]
    assert [m.p for m in vit.modules() if isinstance(m, nn.Dropout)] == [0.25] * (1 + 2 * 3 + 1)
    resnet = ResNet(ResNetConfig(layers=(1,), widths=(4,), stem="cifar", num_classes=2, drop_rate=0.4))
    assert _dropout_rates(resnet) == [0.4]


# ----------------------------------------------------------------------------- ViT heads and buffers
def test_vit_one_class_still_gets_a_linear_head():
    m = _tiny_vit(num_classes=1)
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 1
    assert m(torch.randn(2, 3, 8, 8)).shape == (2, 1)
    m0 = _tiny_vit(num_classes=0)
    assert isinstance(m0.head, nn.Identity) and m0(torch.randn(2, 3, 8, 8)).shape == (2, 16)
    d1 = _tiny_vit(num_classes=1, distilled=True)
    assert isinstance(d1.head_dist, nn.Linear) and d1.head_dist.out_features == 1
    assert isinstance(_tiny_vit(num_classes=0, distilled=True).head_dist, nn.Identity)


def test_vit_fixed_sincos_table_is_not_saved():
    # A fixed table is rebuilt from the config: it must not appear in checkpoints (a timm model
    # loading ours would get an unexpected key), but it must follow .to() like any buffer.
    m = _tiny_vit(pos_embed="sincos2d")
    assert "pos_embed" not in m.state_dict() and "pos_embed" in dict(m.named_buffers())
    assert m.pos_embed.shape == (1, 1 + 4, 16)
    assert torch.equal(m.pos_embed[0, 0], torch.zeros(16))  # [CLS] carries no position
    learned = _tiny_vit()
    assert "pos_embed" in learned.state_dict()
    s2s = Seq2SeqTransformer(
        Seq2SeqConfig(
            src_vocab_size=11,
            tgt_vocab_size=11,
            d_model=8,
            num_heads=2,
            enc_layers=1,
            dec_layers=1,
            mlp_dim=8,
        )
    )
    assert "pos_table" not in s2s.state_dict()


# ----------------------------------------------------------------------------- documented defaults
@torch.no_grad()
def test_sampling_defaults_are_temperature_one():
    from vitlens.models.gpt import sample_next

    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).expand(300, -1)
    plain = sample_next(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, sample_next(logits, 1.0, None, torch.Generator().manual_seed(0)))
    assert torch.equal(
        plain, torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(0))
    )
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)).eval()
    with torch.no_grad():
        gpt.wte.weight.mul_(50)  # peaked enough that temperature changes the draws
    prompt = torch.ones(4, 2, dtype=torch.long)
    out = gpt.generate(prompt, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        out, gpt.generate(prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    )


def test_mask_tokens_random_tokens_start_at_zero_by_default():
    ids = torch.ones(40, 50, dtype=torch.long)
    inputs, labels = mask_tokens(ids, vocab_size=2, mask_id=7, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert set(inputs[chosen].tolist()) == {0, 1, 7}  # [random_low=0, vocab_size) replacements include 0
    assert set(inputs[~chosen].tolist()) == {1}


@torch.no_grad()
def test_position_ids_and_palette_indices_follow_the_inputs_device():
    # A user who set a default device (here "meta") and runs CPU models on CPU inputs: every
    # index tensor must be made where the inputs are, so results equal the plain call.
    from vitlens.models.tokenizers.palette import assign_palette

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)).eval()
    bert = Bert(BertConfig(vocab_size=11, max_len=8, depth=1, num_heads=2, embed_dim=8, dropout=0.0)).eval()
    ids = torch.tensor([[1, 2, 3, 0]])
    pad = ids == 0
    pixels, palette = torch.rand(4, 3) * 255, torch.rand(5, 3) * 255
    want = gpt(ids), bert(ids, key_padding_mask=pad), assign_palette(pixels, palette)
    with torch.device("meta"):
        got = gpt(ids), bert(ids, key_padding_mask=pad), assign_palette(pixels, palette)
    for w, g in zip(want, got):
        assert g.device.type == "cpu" and torch.equal(g, w)


def test_vit_register_and_distillation_tokens_start_tiny_but_not_zero():
    # timm: [CLS], registers and DeiT's distillation token ~ N(0, 1e-6): symmetric but not all equal
    torch.manual_seed(0)
    for kw, name in (
        (dict(num_registers=3, pool="gap", class_token=False), "reg_token"),
        (dict(distilled=True), "dist_token"),
    ):
        token = getattr(_tiny_vit(embed_dim=64, **kw), name).detach()
        assert 0 < token.abs().max().item() < 1e-5 and token.std().item() == pytest.approx(1e-6, rel=0.3)


def test_top_k_above_the_vocabulary_keeps_every_token_of_a_single_sequence():
    from vitlens.models.gpt import sample_next

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.2, -0.5]])  # one sequence (B=1), 5 tokens
    draws = {sample_next(logits, 1.0, top_k=100, generator=g).item() for _ in range(200)}
    assert draws == {0, 1, 2, 3, 4}
    draws = {sample_next(logits, 1.0, top_k=3, generator=g).item() for _ in range(200)}
    assert draws == {1, 2, 3}


@torch.no_grad()
def test_seq2seq_target_padding_needs_no_mask_but_a_given_one_is_applied():
    torch.manual_seed(0)
    cfg = Seq2SeqConfig(
        src_vocab_size=11,
        tgt_vocab_size=11,
        d_model=8,
        num_heads=2,
        enc_layers=1,
        dec_layers=1,
        mlp_dim=8,
        dropout=0.0,
    )
    s2s = Seq2SeqTransformer(cfg).eval()
    memory = s2s.encode(torch.tensor([[3, 4, 5]]))
    tgt = torch.tensor([[1, 6, 7, 0, 0]])  # padding after every real token
    pad = tgt == 0
    plain = s2s.decode(tgt, memory)
    masked = s2s.decode(tgt, memory, tgt_padding_mask=pad)
    # the causal mask already hides the trailing padding from the real tokens ...
    torch.testing.assert_close(masked[:, :3], plain[:, :3])
    # ... and the mask, when given, hides the padded keys from the padding queries too
    assert not torch.allclose(masked[:, 3:], plain[:, 3:])


def test_resnet9_without_classes_returns_the_pooled_features():
    m = ResNetFast(ResNetFastConfig(widths=(4, 8), residual=(False,), num_classes=0)).eval()
    assert isinstance(m.fc, nn.Identity) and m.num_features == 8
    x = torch.randn(2, 3, 8, 8)
    assert not [k for k in m.state_dict() if k.startswith("fc")]  # no classifier weights
    with torch.no_grad():
        feats = m(x)
        # global max-pool of the last stage, as the other models' num_classes=0 (the 0.125 scale
        # belongs to the logits only)
        torch.testing.assert_close(feats, m.forward_features(x).amax(dim=(2, 3)))
        torch.testing.assert_close(feats, m.forward_head(m.forward_features(x), pre_logits=True))
    assert feats.shape == (2, 8)


@pytest.mark.parametrize("shared", [True, False])
def test_seq2seq_padding_rows_get_no_gradient(shared):
    cfg = Seq2SeqConfig(
        src_vocab_size=11,
        tgt_vocab_size=11,
        d_model=8,
        num_heads=2,
        enc_layers=1,
        dec_layers=1,
        mlp_dim=8,
        dropout=0.0,
        share_src_tgt_embed=shared,
        tie_embeddings=False,
    )
    s2s = Seq2SeqTransformer(cfg)
    src, tgt = torch.tensor([[3, 4, 0]]), torch.tensor([[1, 5, 0]])
    s2s(src, tgt).sum().backward()
    for emb in (s2s.src_embed, s2s.tgt_embed):
        assert emb.padding_idx == 0 and torch.count_nonzero(emb.weight.grad[0]) == 0
        assert torch.count_nonzero(emb.weight.grad[3:6]) > 0
