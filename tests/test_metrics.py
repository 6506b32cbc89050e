"""Tests for miniproclip/metrics.py: hand-worked retrieval and classification numbers, tie and edge behaviour,
and two independent retrieval references (CLIP_benchmark's positive-pair/one-hot algorithm, a brute-force loop)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from miniproclip.metrics import classification_metrics, load_templates, retrieval_metrics, zeroshot_classifier

# -----------------------------------------------------------------------------
# retrieval: hand-worked gallery


def features_with_scores(scores):
    """Unit image/text features whose text @ image.T equals `scores` (T, I): images are the first I basis
    vectors, each text row is its scores plus one slack coordinate that brings its norm to 1."""
    num_texts, num_images = scores.shape
    images = torch.eye(num_images, num_images + 1)  # (I, I+1)
    slack = (1 - (scores ** 2).sum(dim=1, keepdim=True)).sqrt()  # (T, 1)
    texts = torch.cat([scores, slack], dim=1)  # (T, I+1)
    return images, texts


# 3 images with 2 captions each; rows are texts, columns images; text_to_image = [0, 0, 1, 1, 2, 2]
HAND_SCORES = 0.5 * torch.tensor([
    [0.9, 0.1, 0.0],    # t0 (img0): top1 img0 -> hit @1
    [0.3, 0.5, 0.1],    # t1 (img0): top1 img1, top2 {1, 0} -> hit @2
    [0.2, 0.4, 0.3],    # t2 (img1): top1 img1 -> hit @1
    [0.6, 0.2, 0.85],   # t3 (img1): top2 {2, 0} -> miss @2, hit @3
    [0.1, 0.45, 0.8],   # t4 (img2): top1 img2 -> hit @1
    [0.4, 0.0, 0.35],   # t5 (img2): top1 img0, top2 {0, 2} -> hit @2
])
HAND_TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
# columns (image -> text): img0 top1 t0 (own) -> hit @1
#                          img1 [.1 .5 .4 .2 .45 0]: top2 {t1, t4} (img0, img2) miss @2, top3 adds t2 -> hit @3
#                          img2 [0 .1 .3 .85 .8 .35]: top1 t3 (img1) miss, top2 adds t4 -> hit @2


def test_retrieval_hand_worked():
    images, texts = features_with_scores(HAND_SCORES)
    metrics = retrieval_metrics(images, texts, HAND_TEXT_TO_IMAGE, ks=(1, 2, 3))
    expected = {
        "image_retrieval_recall@1": 3 / 6, "image_retrieval_recall@2": 5 / 6, "image_retrieval_recall@3": 1.0,
        "text_retrieval_recall@1": 1 / 3, "text_retrieval_recall@2": 2 / 3, "text_retrieval_recall@3": 1.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-7), key


def test_retrieval_all_tied_gallery():
    # 4 identical images and 4 identical captions (one per image): every score ties. torch.topk breaks ties in an
    # unspecified but row-independent order, so every query gets the same top-K list and exactly K of the 4
    # queries hit. A "pessimistic" rank (count of scores >= own) would give 0 @1, an optimistic one 1.
    images = F.normalize(torch.ones(4, 8), dim=-1)
    texts = images.clone()
    metrics = retrieval_metrics(images, texts, torch.arange(4), ks=(1, 2, 4))
    for k in (1, 2, 4):
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(k / 4)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(k / 4)


def test_retrieval_tie_inside_top_k_is_a_hit():
    # text 0's image (1) ties with image 0 for first place: with K=2 both are in, a hit whatever the order;
    # text 1 (image 2) ranks its own image last, a miss
    scores = 0.5 * torch.tensor([[0.6, 0.6, 0.1], [0.9, 0.8, 0.7]])
    images, texts = features_with_scores(scores)
    metrics = retrieval_metrics(images, texts, torch.tensor([1, 2]), ks=(2,))
    assert metrics["image_retrieval_recall@2"] == 0.5


def test_retrieval_k_larger_than_gallery_raises():
    # CLIP_benchmark's torch.topk raises "selected index k out of range"; we raise a readable error instead
    images, texts = features_with_scores(HAND_SCORES)
    with pytest.raises(ValueError, match="recall@4 needs at least 4 images"):
        retrieval_metrics(images, texts, HAND_TEXT_TO_IMAGE, ks=(1, 4))
    # 3 images but only 2 texts: K=3 fits the image gallery, not the text gallery
    with pytest.raises(ValueError, match="recall@3 needs at least 3 texts"):
        retrieval_metrics(images, texts[:2], HAND_TEXT_TO_IMAGE[:2], ks=(3,))


def test_retrieval_image_without_caption_counts_as_miss():
    # texts only for img0 and img1; with K=2 every text is retrieved, so img0 and img1 hit and img2 (no caption)
    # scores 0, as CLIP_benchmark's 0/0 = nan recall (nan > 0 is False)
    images, texts = features_with_scores(HAND_SCORES[:2])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(2,))
    assert metrics["text_retrieval_recall@2"] == pytest.approx(2 / 3)


def test_retrieval_rejects_bad_text_to_image():
    images, texts = features_with_scores(HAND_SCORES)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1, 2, 3]), ks=(1,))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1,))


# -----------------------------------------------------------------------------
# retrieval: independent references on random galleries with duplicated features


def clip_benchmark_recall(images, texts, text_to_image, k):
    """CLIP_benchmark's algorithm, rewritten: a (T, I) positive-pair matrix, one-hot top-k, true positives
    over positives per query, recall@K = mean of (recall > 0). Returns (image_retrieval, text_retrieval)."""
    scores = texts @ images.T  # (T, I)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_to_image] = True

    def hit_rate(s, pos):
        top = s.topk(k, dim=1).indices  # (Q, k)
        onehot = F.one_hot(top, num_classes=s.shape[1])  # (Q, k, G)
        true_positives = (onehot * pos[:, None, :]).sum(dim=(1, 2))  # (Q,)
        return ((true_positives / pos.sum(dim=1)) > 0).float().mean().item()

    return hit_rate(scores, positive), hit_rate(scores.T, positive.T)


def brute_force_recall_bounds(images, texts, text_to_image, k):
    """Plain-python recall@K with float64 dot products. A positive tied with negatives across the K boundary
    can go either way, so return (lowest, highest) possible recall for each direction."""
    images, texts, owner = images.double().tolist(), texts.double().tolist(), text_to_image.tolist()
    scores = [[sum(a * b for a, b in zip(t, i)) for i in images] for t in texts]  # (T, I) nested lists

    def bounds(rows, positives_of):
        low = high = 0
        for q, row in enumerate(rows):
            positives = positives_of(q)
            kth = sorted(row, reverse=True)[k - 1]
            above = [j for j, s in enumerate(row) if s > kth]  # surely in the top K
            tied = [j for j, s in enumerate(row) if s == kth]  # K - len(above) of these get in
            slots = k - len(above)
            if any(j in positives for j in above):
                low, high = low + 1, high + 1
            elif any(j in positives for j in tied):
                high += 1
                low += sum(j not in positives for j in tied) < slots  # not enough negatives to fill the slots
        return low / len(rows), high / len(rows)

    image_retrieval = bounds(scores, lambda t: {owner[t]})
    columns = [list(col) for col in zip(*scores)]
    text_retrieval = bounds(columns, lambda i: {t for t, o in enumerate(owner) if o == i})
    return image_retrieval, text_retrieval


def random_gallery(seed, duplicates):
    """12 images, ~2.5 noisy captions each (image 11 has none); with `duplicates`, images 2/5/9 are identical
    and a few captions are copied onto other images, creating exact ties."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    text_to_image = torch.randint(0, 11, (30,), generator=g)
    if duplicates:
        images[5] = images[9] = images[2]
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(30, 16, generator=g), dim=-1)
    if duplicates:
        texts[7], texts[19], texts[25] = texts[3], texts[3], texts[11]
    return images, texts, text_to_image


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("duplicates", [False, True])
def test_retrieval_matches_references(seed, duplicates):
    images, texts, text_to_image = random_gallery(seed, duplicates)
    ks = (1, 2, 5, 10)
    metrics = retrieval_metrics(images, texts, text_to_image, ks=ks)
    for k in ks:
        ours = metrics[f"image_retrieval_recall@{k}"], metrics[f"text_retrieval_recall@{k}"]
        # exact equality with CLIP_benchmark's algorithm: same torch.topk on the same scores, ties included
        assert ours == clip_benchmark_recall(images, texts, text_to_image, k)
        # the brute force pins every query whose outcome does not hinge on a tie
        for value, (low, high) in zip(ours, brute_force_recall_bounds(images, texts, text_to_image, k)):
            assert low - 1e-6 <= value <= high + 1e-6  # our mean is float32
            if not duplicates:
                assert low == high == pytest.approx(value)


def test_random_duplicates_do_create_boundary_ties():
    # guards the test above: with duplicates, some query's outcome must really depend on tie breaking
    spreads = [high - low for seed in range(6)
               for bound in brute_force_recall_bounds(*random_gallery(seed, duplicates=True), k=1)
               for low, high in [bound]]
    assert max(spreads) > 0


# -----------------------------------------------------------------------------
# zero-shot classification


def test_classification_metrics_hand_worked():
    # 6 classes, imbalanced labels: class 0 four times, classes 1 and 2 once, classes 3-5 never
    logits = torch.tensor([
        [5., 4, 3, 2, 1, 0],     # label 0: argmax 0 -> top1 hit
        [9., 1, 2, 3, 4, 5],     # label 0: hit
        [3., 0, 1, 2, -1, -2],   # label 0: hit
        [-5., 1, 2, 3, 4, 0],    # label 0: argmax 4 (a class absent from labels), label ranked last -> top5 miss
        [6., 5, 0, 1, 2, 3],     # label 1: argmax 0, label second -> top5 hit
        [0., 1, 7, 2, 3, 4],     # label 2: hit
    ])
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(4 / 6)
    assert metrics["acc5"] == pytest.approx(5 / 6)
    # per-class recall over classes present in labels: (3/4 + 0/1 + 1/1) / 3; classes 3-5 are left out
    assert metrics["mean_per_class_recall"] == pytest.approx(7 / 12)


def test_classification_metrics_fewer_than_five_classes():
    logits = torch.tensor([[2., 1, 0], [0., 1, 0.5], [0., 3, 1]])  # argmax 0, 1, 1
    labels = torch.tensor([0, 0, 1])
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["acc5"])  # CLIP_benchmark reports nan when C < 5
    assert metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 1) / 2)


def test_classification_metrics_exactly_five_classes():
    # C = 5 is the smallest C with an acc5, and it is trivially 1
    logits = torch.tensor([[0., 1, 2, 3, 4], [4., 3, 2, 1, 0]])  # argmax 4, 0
    metrics = classification_metrics(logits, torch.tensor([0, 0]))
    assert (metrics["acc1"], metrics["acc5"], metrics["mean_per_class_recall"]) == (0.5, 1.0, 0.5)


def test_classification_metrics_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_zeroshot_classifier_averages_normalised_template_embeddings():
    table = {"a cat.": [3., 4.], "the cat.": [0., 2.], "a dog.": [1., 0.], "the dog.": [-1., 1.]}
    calls = []

    def encode(texts):
        calls.append(texts)
        return torch.tensor([table[t] for t in texts])

    weights = zeroshot_classifier(encode, ["cat", "dog"], ["a {c}.", "the {c}."])
    assert calls == [["a cat.", "the cat."], ["a dog.", "the dog."]]
    # cat: mean([.6, .8], [0, 1]) = [.3, .9] -> [1, 3] / sqrt(10)   (without per-template normalisation:
    # mean([3, 4], [0, 2]) would point along [1, 2] instead)
    # dog: mean([1, 0], [-1, 1] / sqrt 2) points at 67.5 degrees -> [cos 67.5, sin 67.5]
    expected = torch.tensor([[1 / math.sqrt(10), math.cos(math.radians(67.5))],
                             [3 / math.sqrt(10), math.sin(math.radians(67.5))]])  # (D, C)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------
# templates


def test_default_templates_are_openai_imagenet_80():
    templates = load_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(t.count("{c}") == 1 for t in templates)
    # first and last of OpenAI's Prompt_Engineering_for_ImageNet.ipynb list, in its order
    assert templates[0] == "a bad photo of a {c}."
    assert templates[39] == "a photo of a {c}."
    assert templates[-1] == "a tattoo of the {c}."


@pytest.mark.parametrize("bad", [["a {c}.", "no placeholder"], ["a {}."], ["a {c} {"], ["a {{c}}."]])
def test_load_templates_rejects_template_without_placeholder(tmp_path, bad):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"templates\.json.*\{c\}"):
        load_templates(path)


def test_load_templates_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_templates(tmp_path / "nope.json")
