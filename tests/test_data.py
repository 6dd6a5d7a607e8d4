"""Bundled task sets and noise injection: sizes, disjoint sources, seeded, ground truth kept."""

import numpy as np
import pytest
import torch

from sgs_lab.data import inject_noise, make_digit_attributes, make_multidigits, missing_mask


def test_multidigits_shapes_ids_and_seeding():
    train, test = make_multidigits(300, 100, seed=3)
    assert train.x.shape == (300, 1, 12, 12) and test.x.shape == (100, 1, 12, 12)
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert list(train.tasks) == ["left", "right"] and train.tasks["left"].n_classes == 10
    ids = torch.cat([train.sample_id, test.sample_id])
    assert len(torch.unique(ids)) == 400  # stable ids, unique across the split
    again, _ = make_multidigits(300, 100, seed=3)
    assert torch.equal(again.x, train.x) and torch.equal(again.labels["left"], train.labels["left"])
    other, _ = make_multidigits(300, 100, seed=4)
    assert not torch.equal(other.x, train.x)
    x, y = train[5]
    assert x.shape == (1, 12, 12) and set(y) == {"left", "right"}


def test_multidigits_train_and_test_use_disjoint_source_images(monkeypatch):
    import sgs_lab.data.digits as digits

    n = 1797  # each source image painted with its own index, so a pixel says where a digit came from
    coded = np.repeat((np.arange(n, dtype=np.float32) + 1)[:, None, None], 8, 1).repeat(8, 2)
    monkeypatch.setattr(digits, "_digits", lambda: (coded, np.arange(n) % 10))
    train, test = make_multidigits(400, 400, seed=0, jitter=0)

    def sources(ts):  # corner pixels: only the left digit covers (0, 0), only the right one (10, 10)
        return set(ts.x[:, 0, 0, 0].long().tolist()) | set(ts.x[:, 0, 10, 10].long().tolist())

    train_src, test_src = sources(train), sources(test)
    assert train_src.isdisjoint(test_src)
    assert len(test_src) > 300 and len(train_src) > 500  # both pools really used


def test_digit_attributes_are_consistent_with_the_digit():
    train, test = make_digit_attributes(seed=1)
    assert len(train) + len(test) == 1797
    d = train.labels["digit"]
    assert torch.equal(train.labels["parity"], d % 2)
    assert torch.equal(train.labels["large"], (d >= 5).long())
    assert torch.equal(train.labels["loop"], torch.isin(d, torch.tensor([0, 6, 8, 9])).long())
    assert train.tasks["ink"].kind == "regression" and train.labels["ink"].dtype == torch.float32
    assert abs(float(train.labels["ink"].mean())) < 1e-4  # standardised on the training split


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6])
def test_noise_flips_exactly_the_rate_and_always_changes_the_label(kind, rate):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    noisy, flipped = inject_noise(labels, rate, 10, kind=kind, seed=1)
    assert flipped.sum() == round(rate * 1000)
    assert np.array_equal(noisy != labels, flipped)
    if kind == "pairflip":
        assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % 10)


def test_symmetric_noise_spreads_over_the_other_classes():
    labels = np.zeros(20000, dtype=np.int64)
    noisy, flipped = inject_noise(labels, 0.5, 5, seed=0)
    counts = np.bincount(noisy[flipped], minlength=5)
    assert counts[0] == 0 and counts[1:].min() > 0.2 * flipped.sum()


def test_taskset_noise_keeps_the_ground_truth():
    train, _ = make_multidigits(500, 50, seed=0)
    noisy = train.with_noise({"left": 0.4, "right": 0.2}, seed=2)
    assert torch.equal(noisy.clean["left"], train.labels["left"])
    assert float(noisy.noisy["left"].float().mean()) == pytest.approx(0.4)
    assert float(noisy.noisy["right"].float().mean()) == pytest.approx(0.2)
    assert torch.equal(noisy.labels["left"] != noisy.clean["left"], noisy.noisy["left"])
    missing = noisy.with_missing({"right": 0.25}, seed=0)
    assert float((~missing.present["right"]).float().mean()) == pytest.approx(0.25)
    assert missing.present["left"].all()


def test_only_keeps_the_named_tasks():
    train, _ = make_multidigits(50, 10, seed=0)
    left = train.with_noise(0.2).only(["left"])
    assert list(left.tasks) == ["left"] and set(left.labels) == {"left"} and left.noisy["left"].any()
    with pytest.raises(ValueError, match="unknown task"):
        train.only(["middle"])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        inject_noise(np.zeros(5, dtype=int), 1.0, 10)
    with pytest.raises(ValueError, match="unknown noise kind"):
        inject_noise(np.zeros(5, dtype=int), 0.1, 10, kind="asym")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        missing_mask(5, -0.1)
    with pytest.raises(ValueError, match="positive sizes"):
        make_multidigits(0, 10)
    train, _ = make_digit_attributes()
    with pytest.raises(ValueError, match="regression task"):
        train.with_noise({"ink": 0.2})
    with pytest.raises(ValueError, match="empty"):
        train.subset(torch.tensor([], dtype=torch.long))


@pytest.mark.parametrize("angle", [0.0, 60.0, 90.0, 150.0])
def test_toy_problem_conflict_is_controlled_by_the_angle(angle):
    from sgs_lab.data import ToyProblem

    problem = ToyProblem(angle=angle, anisotropy=2.0)
    origin = torch.zeros(1, 2, dtype=torch.float64)
    assert float(problem.conflict(origin)) == pytest.approx(np.cos(np.radians(angle)), abs=1e-6)
    theta = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    autograd = torch.autograd.grad(problem.losses(theta).sum(), theta)[0]
    assert torch.allclose(problem.gradients(theta.detach()).sum(0), autograd)  # closed form = autograd
    assert torch.allclose(
        problem.losses(problem.centres().double())[[0, 1], [0, 1]], torch.zeros(2, dtype=torch.float64)
    )


def test_from_dataset_adapts_any_map_style_dataset():
    from sgs_lab.data import from_dataset

    items = [(torch.full((3,), float(i)), {"cls": i % 3, "reg": float(i) / 2}) for i in range(7)]
    ts = from_dataset(items)
    assert ts.x.shape == (7, 3) and ts.tasks["cls"].n_classes == 3 and ts.tasks["reg"].kind == "regression"
    assert ts.labels["cls"].dtype == torch.long and torch.equal(ts.sample_id, torch.arange(7))
    assert ts.with_noise({"cls": 0.4}, seed=0).noisy["cls"].sum() == 3
    with pytest.raises(TypeError, match=r"\(x, \{task: label\}\)"):
        from_dataset([torch.zeros(3)])
    with pytest.raises(ValueError, match="empty"):
        from_dataset([])


def test_fingerprints_tell_task_order_and_labels_apart():
    from sgs_lab.data import make_multidigits

    train, _ = make_multidigits(64, 32, seed=0)
    assert train.fingerprint() == make_multidigits(64, 32, seed=0)[0].fingerprint()
    assert train.only(["right", "left"]).fingerprint() != train.fingerprint()  # heads are built in task order
    assert train.with_noise(0.2, seed=0).fingerprint() != train.fingerprint()


def test_missing_labels_are_drawn_independently_of_the_flipped_ones():
    from sgs_lab.data import make_multidigits

    train, _ = make_multidigits(1000, 10, seed=0)
    both = train.with_noise(0.3, seed=0).with_missing({"left": 0.3, "right": 0.3}, seed=0)
    for task in ("left", "right"):
        hidden = ~both.present[task]
        share = float(both.noisy[task][hidden].float().mean())  # about the noise rate, not 1
        assert int(hidden.sum()) == 300 and 0.2 < share < 0.4
