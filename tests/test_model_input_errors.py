"""A wrong input to a model is a ModelError (still a ValueError) at the model's entry, whose whole
message names the problem and the fix; never a torch error from deep inside.

One row per mistake a user makes: the model (by registered name, so the message names it), the
call, and the exact message. Each fix a message promises is checked to work (set_image_size, the
batch dimension, .long(), cropping to the context)."""

from __future__ import annotations

import pytest
import torch

import vitlens
from vitlens.errors import ModelError
from vitlens.layers.attention import Attention

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    """Each model built once, in eval mode (no dropout), by name: create_model records the name."""
    if name not in _MODELS:
        _MODELS[name] = vitlens.create_model(name).eval()
    return _MODELS[name]


def ids(*shape, value=1, dtype=torch.long):
    return torch.full(shape, value, dtype=dtype)


def img(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


RESIZE_VIT = (
    "vit_micro_patch4_32 was built for 32x32 images, got 64x64; resize the images to 32x32 or call "
    "model.set_image_size((64, 64)) to adapt the model (its position embeddings are resampled)"
)
CASES = [
    # ---- ViTs: size, channels, batch, dtype, for every tokenizer
    ("vit-wrong-size", lambda: model("vit_micro_patch4_32")(img(2, 3, 64, 64)), RESIZE_VIT),
    (
        "vit-wrong-aspect",
        lambda: model("vit_micro_patch4_32")(img(1, 3, 32, 64)),
        "vit_micro_patch4_32 was built for 32x32 images, got 32x64; resize the images to 32x32 or call "
        "model.set_image_size((32, 64)) to adapt the model (its position embeddings are resampled)",
    ),
    (
        "vit-size-not-divisible-by-patch",
        lambda: model("vit_micro_patch4_32")(img(1, 3, 30, 30)),
        "image size 30x30 is not divisible by patch size 4x4; resize the images (e.g. --img-size) or choose "
        "a patch size that divides them",
    ),
    (
        "vit-grayscale",
        lambda: model("vit_micro_patch4_32")(img(2, 1, 32, 32)),
        "vit_micro_patch4_32 was built for 3-channel images, got 1-channel images (shape (2, 1, 32, 32)); "
        "convert the images (e.g. grayscale to RGB) or build the model with in_chans=1",
    ),
    (
        "vit-one-image-without-batch",
        lambda: model("vit_micro_patch4_32")(img(3, 32, 32)),
        "vit_micro_patch4_32 expects a batch of images (B, 3, H, W), got shape (3, 32, 32); add the batch "
        "dimension with x.unsqueeze(0)",
    ),
    (
        "vit-5d",
        lambda: model("vit_micro_patch4_32")(img(1, 1, 3, 32, 32)),
        "vit_micro_patch4_32 expects a batch of images (B, 3, H, W), got shape (1, 1, 3, 32, 32)",
    ),
    (
        "vit-uint8-images",
        lambda: model("vit_micro_patch4_32")(img(1, 3, 32, 32, dtype=torch.uint8)),
        "vit_micro_patch4_32 expects float images normalised like its training data, got torch.uint8; "
        "convert them (x.float() / 255, then subtract the mean and divide by the std of the model's "
        "transforms)",
    ),
    (
        "pixel-vit-wrong-size",
        lambda: model("vit_micro_pixel16_32")(img(2, 3, 64, 64)),
        "vit_micro_pixel16_32 was built for 32x32 images, got 64x64; resize the images to 32x32 (the "
        "'pixel' tokenizer has a fixed input size)",
    ),
    (
        "pixel-vit-set-image-size",
        lambda: model("vit_micro_pixel16_32").set_image_size(64),
        "the 'pixel' tokenizer has a fixed input size; resize the images to 32x32 instead",
    ),
    (
        "vq-vit-size-off-its-token-grid",
        lambda: model("vit_micro_vq_32")(img(1, 3, 30, 30)),
        "vit_micro_vq_32 was built for 32x32 images, got 30x30; resize the images to 32x32 (30x30 is not a "
        "multiple of its 4x4 tokens)",
    ),
    (
        "hybrid-vit-wrong-size",
        lambda: model("vit_micro_hybrid_32")(img(1, 3, 64, 64)),
        "vit_micro_hybrid_32 was built for 32x32 images, got 64x64; resize the images to 32x32 or call "
        "model.set_image_size((64, 64)) to adapt the model (its position embeddings are resampled)",
    ),
    # ---- CNNs
    (
        "resnet-grayscale",
        lambda: model("resnet8_cifar")(img(2, 1, 32, 32)),
        "resnet8_cifar was built for 3-channel images, got 1-channel images (shape (2, 1, 32, 32)); "
        "convert the images (e.g. grayscale to RGB) or build the model with in_chans=1",
    ),
    (
        "resnet-one-image-without-batch",
        lambda: model("resnet8_cifar")(img(3, 32, 32)),
        "resnet8_cifar expects a batch of images (B, 3, H, W), got shape (3, 32, 32); add the batch "
        "dimension with x.unsqueeze(0)",
    ),
    (
        "resnet9-fast-too-small",  # was torch's "Output size is too small" from its third max-pool
        lambda: model("resnet9_fast")(img(2, 3, 4, 4)),
        "resnet9_fast halves the image in each of its 3 stages, so it needs images of at least 8x8, got "
        "4x4; upsample the images",
    ),
    (
        "resnet9-fast-too-narrow",
        lambda: model("resnet9_fast")(img(1, 3, 32, 7)),
        "resnet9_fast halves the image in each of its 3 stages, so it needs images of at least 8x8, got "
        "32x7; upsample the images",
    ),
    # ---- GPT (gpt_nano: vocabulary 65, context 64)
    (
        "gpt-longer-than-context",
        lambda: model("gpt_nano")(ids(1, 65)),
        "sequence of 65 tokens exceeds the context of gpt_nano (64 tokens); crop it to the last 64 tokens "
        "(generate() does this itself)",
    ),
    (
        "gpt-cache-past-context",
        lambda: model("gpt_nano").forward_features(ids(1, 2), kv_cache=[{}, {}], start_pos=63),
        "sequence of 65 tokens exceeds the context of gpt_nano (64 tokens); crop it to the last 64 tokens "
        "(generate() does this itself)",
    ),
    (
        "gpt-unbatched",
        lambda: model("gpt_nano")(ids(5)),
        "gpt_nano expects token ids of shape (B, T), got (5,); add the batch dimension with ids.unsqueeze(0)",
    ),
    (
        "gpt-float-ids",  # was torch's "Expected tensor for argument #1 'indices' ..."
        lambda: model("gpt_nano")(ids(1, 5, dtype=torch.float32)),
        "gpt_nano expects integer token ids, got torch.float32; pass the ids its tokenizer gives as a "
        "torch.long tensor (ids.long())",
    ),
    (
        "gpt-id-past-vocabulary",  # was torch's "index out of range in self"
        lambda: model("gpt_nano")(ids(1, 5, value=65)),
        "token id 65 is outside the vocabulary of gpt_nano (ids 0..64); encode the text with the tokenizer "
        "the model was trained with",
    ),
    (
        "gpt-negative-id",
        lambda: model("gpt_nano")(torch.tensor([[3, -1, 2]])),
        "token id -1 is outside the vocabulary of gpt_nano (ids 0..64); encode the text with the tokenizer "
        "the model was trained with",
    ),
    (
        "gpt-cache-of-another-depth",
        lambda: model("gpt_nano").forward_features(ids(1, 2), kv_cache=[{}]),
        "kv_cache needs one dict per block (2), got 1; start it with model.new_cache()",
    ),
    (
        "gpt-negative-temperature",
        lambda: model("gpt_nano").generate(ids(1, 1), 2, temperature=-1.0),
        "temperature must be >= 0 (0 = greedy), got -1.0",
    ),
    # ---- BERT (bert_nano: vocabulary 69, max_len 64)
    (
        "bert-longer-than-max-len",
        lambda: model("bert_nano")(ids(2, 65)),
        "sequence of 65 tokens exceeds the max_len of bert_nano (64, its learned position table); truncate "
        "it to 64 tokens",
    ),
    (
        "bert-id-past-vocabulary",
        lambda: model("bert_nano")(ids(1, 3, value=69)),
        "token id 69 is outside the vocabulary of bert_nano (ids 0..68); encode the text with the "
        "tokenizer the model was trained with",
    ),
    (
        "bert-unbatched",
        lambda: model("bert_nano")(ids(3)),
        "bert_nano expects token ids of shape (B, T), got (3,); add the batch dimension with "
        "ids.unsqueeze(0)",
    ),
    # ---- encoder-decoder (transformer_nano: vocabularies 64, max_len 64)
    (
        "seq2seq-source-longer-than-max-len",
        lambda: model("transformer_nano")(ids(1, 65), ids(1, 3)),
        "sequence of 65 tokens exceeds max_len 64; truncate the input or build the model with a larger "
        "max_len (its sinusoidal positions need no training)",
    ),
    (
        "seq2seq-unbatched-source",  # was torch's "tuple index out of range"
        lambda: model("transformer_nano")(ids(5), ids(1, 3)),
        "transformer_nano expects token ids of shape (B, T), got (5,); add the batch dimension with "
        "ids.unsqueeze(0)",
    ),
    (
        "seq2seq-target-id-past-vocabulary",
        lambda: model("transformer_nano")(ids(1, 4), ids(1, 3, value=64)),
        "token id 64 is outside the vocabulary of transformer_nano (ids 0..63); encode the text with the "
        "tokenizer the model was trained with",
    ),
    (
        "seq2seq-batches-that-do-not-pair",  # was torch's "The size of tensor a (2) must match ..."
        lambda: model("transformer_nano")(ids(3, 4), ids(2, 3)),
        "2 target sequence(s) but 3 source sequence(s) in memory; give one target per source",
    ),
    (
        "seq2seq-decode-without-memory",
        lambda: model("transformer_nano").decode(ids(1, 3), None),
        "decode needs the encoder's output as memory; compute it with model.encode(src)",
    ),
    (
        "cross-attention-without-context",
        lambda: Attention(8, 2, cross=True)(torch.zeros(1, 3, 8)),
        "cross-attention needs a context (the encoder output); pass it as context=...",
    ),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_wrong_input_names_the_problem_and_the_fix(call, message):
    with pytest.raises(ModelError) as err:
        with torch.no_grad():
            call()
    assert type(err.value) is ModelError and isinstance(err.value, ValueError)
    assert str(err.value) == message


@torch.no_grad()
def test_the_fixes_the_messages_promise_work_and_the_limits_are_inclusive():
    # set_image_size adapts a ViT to 64x64 (a fresh model: the cached one stays at 32)
    vit = vitlens.create_model("vit_micro_patch4_32").eval()
    vit.set_image_size(64)
    assert vit(img(2, 3, 64, 64)).shape == (2, 10)
    # a batch dimension, then it runs
    assert model("resnet8_cifar")(img(3, 32, 32).unsqueeze(0)).shape == (1, 10)
    # the smallest image resnet9_fast takes
    assert model("resnet9_fast")(img(1, 3, 8, 8)).shape == (1, 10)
    gpt = model("gpt_nano")
    # exactly the context, the first and last ids of the vocabulary, int32 ids too
    assert gpt(ids(1, 64)).shape == (1, 64, 65)
    assert gpt(torch.tensor([[0, 64]])).shape == (1, 2, 65)
    assert gpt(ids(1, 3, dtype=torch.int32)).shape == (1, 3, 65)
    assert gpt.forward_features(ids(1, 1), kv_cache=gpt.new_cache(), start_pos=63).shape == (1, 1, 32)
    # cropped to the last 64 tokens, a long prompt runs
    assert gpt(ids(1, 80)[:, -64:]).shape == (1, 64, 65)
    assert model("bert_nano").forward_features(torch.tensor([[0, 68] * 32])).shape == (1, 64, 32)
    s2s = model("transformer_nano")
    assert s2s(ids(2, 64), torch.tensor([[0, 63], [63, 0]])).shape == (2, 2, 64)
    # one memory is shared by every target (broadcast), as before
    memory = s2s.encode(ids(1, 4))
    assert s2s.decode(ids(3, 2), memory).shape == (3, 2, 32)
