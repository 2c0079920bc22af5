"""The loss: cross-entropy over the full logit width plus z-loss, against the formula written out by hand."""

from __future__ import annotations

import math

import torch

from idefics.training.collate import IGNORE_INDEX
from idefics.training.loss import LossModel, loss_terms, reference_loss, shift_labels


def test_loss_terms_equal_the_formula_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen) * 3
    targets = torch.tensor([0, 6, 3, 6, 1])  # 6 is beyond a 5-token base vocabulary: an additional token
    ce, z = loss_terms(logits, targets)
    for i in range(5):
        row = [float(x) for x in logits[i]]
        log_z = math.log(sum(math.exp(x) for x in row))
        assert math.isclose(float(ce[i]), log_z - row[int(targets[i])], rel_tol=1e-5)
        assert math.isclose(float(z[i]), log_z**2, rel_tol=1e-5)


def test_reference_loss_is_mean_ce_plus_weighted_mean_square_log_z():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen)
    labels = torch.tensor([[9, 1, 5, IGNORE_INDEX], [9, IGNORE_INDEX, 2, 3]])
    # position t predicts labels[t + 1]: targets at (0,0)->1, (0,1)->5, (1,1)->2, (1,2)->3
    picks = [(0, 0, 1), (0, 1, 5), (1, 1, 2), (1, 2, 3)]
    ce = sum(-torch.log_softmax(logits[b, t].double(), -1)[y] for b, t, y in picks) / 4
    z = sum(torch.logsumexp(logits[b, t].double(), -1) ** 2 for b, t, _ in picks) / 4
    assert torch.allclose(reference_loss(logits, labels, 1e-3).double(), ce + 1e-3 * z, atol=1e-6)
    assert shift_labels(labels).tolist() == [[1, 5, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 2, 3, IGNORE_INDEX]]


def test_loss_model_equals_loss_on_full_logits(reference_checkpoint):
    """LossModel projects only target positions; the result equals the loss on the model's full logits,
    including targets among the additional (new) tokens."""
    from idefics.checkpoint import load_model

    folder, _ = reference_checkpoint("small_instruct")
    model = load_model(folder)
    gen = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size + model.config.additional_vocab_size
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=gen)
    ids[:, 3] = model.config.vocab_size + 1  # <image>
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[0, 7] = vocab - 1  # <end_of_utterance> as a target
    ids[0, 7] = vocab - 1
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    labels[1, 10:] = IGNORE_INDEX
    pixels = torch.randn(2, 1, 3, 56, 56, generator=gen)
    image_mask = torch.zeros(2, 12, 1, dtype=torch.long)
    image_mask[:, 3:10] = 1
    batch = dict(input_ids=ids, attention_mask=attention, pixel_values=pixels, image_attention_mask=image_mask)
    with torch.no_grad():
        logits = model(**batch).logits
        ce, z, n = LossModel(model)(labels=labels, **batch)
    assert logits.shape[-1] == vocab
    assert int(n) == int((shift_labels(labels) != IGNORE_INDEX).sum()) == 8 + 6
    assert torch.allclose((ce + 1e-3 * z) / n, reference_loss(logits, labels, 1e-3), atol=1e-5)


def test_blank_image_column_leaves_the_loss_unchanged(reference_checkpoint):
    """FSDP runs text-only batches with an extra padding column that sees a blank image: same loss."""
    from idefics.checkpoint import load_model
    from idefics.training.collate import with_blank_image

    folder, _ = reference_checkpoint("small_instruct")
    model = load_model(folder)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0
    labels = torch.where(attention.bool(), ids, IGNORE_INDEX)
    batch = dict(input_ids=ids, attention_mask=attention, labels=labels, pixel_values=torch.zeros(2, 1, 3, 56, 56),
                 image_attention_mask=torch.zeros(2, 9, 1, dtype=torch.long))
    image_id = model.config.vocab_size + 1
    blank = with_blank_image(batch, image_id)
    assert blank["input_ids"].shape == (2, 10) and (blank["input_ids"][:, -1] == image_id).all()
    assert not blank["attention_mask"][:, -1].any() and (blank["labels"][:, -1] == IGNORE_INDEX).all()
    assert blank["image_attention_mask"][:, -1, 0].tolist() == [1, 1] and not blank["image_attention_mask"][:, :-1].any()
    with torch.no_grad():
        plain, padded = LossModel(model)(**batch), LossModel(model)(**blank)
    assert all(torch.allclose(a.double(), b.double(), atol=1e-5) for a, b in zip(plain, padded))
    with_images = {**batch, "image_attention_mask": torch.ones(2, 9, 1, dtype=torch.long)}
    assert with_blank_image(with_images, image_id) is with_images
