"""Bad input gets a clear error that says what to do."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgs_lab


def _setup(batch=5, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh()]
    encoder = nn.Sequential(*layers)
    head = nn.Linear(6, 3)
    x = torch.randn(batch, 4)
    y = torch.randint(0, 3, (batch,))
    return encoder, head, x, y


def _captured(probe, encoder, x):
    with probe.capture():
        return encoder(x)


def test_loss_not_per_sample():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    with pytest.raises(ValueError, match='reduction="none"'):
        probe.compute({"a": F.cross_entropy(head(z), y)})
    z = _captured(probe, encoder, x)
    with pytest.raises(ValueError, match=r"shape \(B,\).*squeeze"):
        probe.compute({"a": head(z)[:, :1]})


def test_batch_sizes_differ_between_tasks():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    loss = F.cross_entropy(head(z), y, reduction="none")
    with pytest.raises(ValueError, match="same batch size"):
        probe.compute({"a": loss, "b": loss[:3]})


def test_loss_batch_differs_from_captured_forward():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    with pytest.raises(ValueError, match="captured forward had a batch of 5"):
        probe.compute({"a": F.cross_entropy(head(z[:3]), y[:3], reduction="none")})


def test_loss_not_connected_to_captured_forward():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    _captured(probe, encoder, x)
    other = encoder(x)  # a forward outside capture()
    with pytest.raises(ValueError, match="not connected to the captured forward"):
        probe.compute({"a": F.cross_entropy(head(other), y, reduction="none")})
    with pytest.raises(ValueError, match="no autograd graph"):
        probe.compute({"a": torch.ones(5)})


def test_compute_without_capture():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    loss = F.cross_entropy(head(encoder(x)), y, reduction="none")
    with pytest.raises(RuntimeError, match="probe.capture"):
        probe.compute({"a": loss})


def test_capture_under_no_grad():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    with torch.no_grad(), probe.capture():
        encoder(x)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        probe.compute({"a": torch.zeros(5, requires_grad=True) * 1})


def test_nested_capture():
    encoder, _, x, _ = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        with pytest.raises(RuntimeError, match="nested"):
            with probe.capture():
                pass


def test_train_mode_batchnorm_is_named_and_eval_is_offered():
    encoder, head, x, y = _setup(bn=True)
    probe = sgs_lab.SampleGradients(encoder)
    with pytest.raises(ValueError, match=r"'1'.*batchnorm=\"eval\""):
        with probe.capture():
            encoder(x)
    probe = sgs_lab.SampleGradients(encoder, batchnorm="eval")
    with probe.capture():
        assert not encoder[1].training  # running statistics during capture
        z = encoder(x)
    assert encoder[1].training  # and train mode restored afterwards
    stats = probe.compute({"a": F.cross_entropy(head(z), y, reduction="none")})
    assert torch.isfinite(stats.cosine).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses(bad):
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    loss = F.cross_entropy(head(z), y, reduction="none") * torch.tensor([1, 1, bad, 1, 1])
    with pytest.raises(ValueError, match=r"'a' has 1 NaN/Inf"):
        probe.compute({"a": loss})


def test_labels_of_wrong_shape_or_dtype():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    losses = {"a": F.cross_entropy(head(z), y, reduction="none")}
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        probe.compute(losses, labels={"a": y[:4]}, reference="class")
    with pytest.raises(ValueError, match="integer class ids"):
        probe.compute(losses, labels={"a": y.float()}, reference="class")
    with pytest.raises(ValueError, match="negative"):
        probe.compute(losses, labels={"a": y - 5}, reference="class")
    with pytest.raises(ValueError, match="unknown task 'b'"):
        probe.compute(losses, labels={"b": y}, reference="class")
    with pytest.raises(ValueError, match="needs integer labels"):
        probe.compute(losses, reference="class")


def test_masks_of_wrong_shape_or_dtype():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    losses = {"a": F.cross_entropy(head(z), y, reduction="none")}
    with pytest.raises(ValueError, match="bool tensor of shape"):
        probe.compute(losses, masks={"a": torch.ones(5)})
    with pytest.raises(ValueError, match="unknown task"):
        probe.compute(losses, masks={"b": torch.ones(5, dtype=torch.bool)})


def test_unknown_options_list_the_valid_ones():
    encoder, _, _, _ = _setup()
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*'auto'"):
        sgs_lab.SampleGradients(encoder, backend="fast")
    with pytest.raises(ValueError, match=r"unknown scope 'first'.*'last'"):
        sgs_lab.SampleGradients(encoder, scope="first")
    with pytest.raises(ValueError, match="matches none"):
        sgs_lab.SampleGradients(encoder, params="nothing.*")
    with pytest.raises(ValueError, match="no trainable parameters"):
        sgs_lab.SampleGradients(nn.ReLU())
    with pytest.raises(ValueError, match="EMAReference decay"):
        sgs_lab.EMAReference(decay=1.0)


def test_unknown_reference():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    with pytest.raises(ValueError, match=r"unknown reference 'mean'.*'loo'"):
        probe.compute({"a": F.cross_entropy(head(z), y, reduction="none")}, reference="mean")


def test_ghost_backend_names_layers_without_rule():
    encoder = nn.Sequential(nn.Linear(4, 6), nn.PReLU())
    with pytest.raises(ValueError, match=r"no rule for \['1.weight'\].*backend=\"auto\""):
        sgs_lab.SampleGradients(encoder, backend="ghost")


def test_in_place_change_after_forward_is_refused():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    head = nn.Linear(6, 2)
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(torch.randn(5, 4))
    with pytest.raises(RuntimeError, match=r"modified in place.*inplace=True"):
        probe.compute({"a": head(z).sum(1)})


def test_weights_of_wrong_shape_and_double_backward():
    encoder, head, x, y = _setup()
    probe = sgs_lab.SampleGradients(encoder)
    z = _captured(probe, encoder, x)
    stats = probe.compute({"a": F.cross_entropy(head(z), y, reduction="none")})
    with pytest.raises(ValueError, match=r"sample_weights must have shape \(1, 5\)"):
        stats.backward(torch.ones(5))
    with pytest.raises(ValueError, match=r"task_weights must have shape \(1,\)"):
        stats.backward(None, torch.ones(2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.backward(torch.full((1, 5), float("nan")))
    stats.backward()
    with pytest.raises(RuntimeError, match="already called"):
        stats.backward()


def test_register_grad_rule_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        sgs_lab.register_grad_rule(int)
