"""precise_bn: exact pooled population statistics over a set of batches."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.nn as nl


def _net(bn):
    return torch.nn.Sequential(torch.nn.Linear(4, 6), bn(6), torch.nn.ReLU(), torch.nn.Linear(6, 3), bn(3))


@pytest.mark.parametrize("bn", [nl.BatchNorm1d, torch.nn.BatchNorm1d])
def test_pooled_statistics_over_unequal_batches(bn):
    net = _net(bn).double()
    batches = [torch.randn(n, 4, dtype=torch.float64) * 3 + 1 for n in (5, 17, 2, 9)]
    net.train()
    net(batches[0])  # some history that precise_bn must replace
    nbt = net[1].num_batches_tracked.clone()
    net.eval()
    normlab.precise_bn(net, batches)
    # expected: the first layer's inputs pooled over all 33 samples
    h = torch.cat([net[0](b) for b in batches])
    torch.testing.assert_close(net[1].running_mean, h.mean(0))
    torch.testing.assert_close(net[1].running_var, h.var(0))  # unbiased over all samples
    # the second layer sees the first normalized with each batch's own statistics, as in training
    outs = []
    for b in batches:
        z = net[0](b)
        z = torch.relu((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) * net[1].weight + net[1].bias)
        outs.append(net[3](z))
    h2 = torch.cat(outs)
    torch.testing.assert_close(net[4].running_mean, h2.mean(0))
    torch.testing.assert_close(net[4].running_var, h2.var(0))
    assert not net.training and not net[1].training  # modes restored
    assert torch.equal(net[1].num_batches_tracked, nbt)


def test_dataloader_tuples_num_batches_and_placement_after():
    bn = nl.BatchNorm2d(3, activation="relu", placement="after")
    data = [(torch.randn(4, 3, 5, 5), torch.zeros(4)) for _ in range(5)]
    normlab.precise_bn(bn, data, num_batches=3)
    a = torch.relu(torch.cat([d[0] for d in data[:3]]))  # this layer normalizes relu(x)
    torch.testing.assert_close(bn.running_mean, a.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, a.transpose(0, 1).reshape(3, -1).var(1))
    assert bn.training  # was in training mode before


def test_failure_leaves_buffers_untouched():
    net = _net(nl.BatchNorm1d)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def batches():
        yield torch.randn(8, 4)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        normlab.precise_bn(net, batches())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    nan_batch = torch.randn(8, 4)
    nan_batch[3, 1] = float("nan")
    for bad, match in (([torch.randn(1, 4)], "more than 1 value per channel"), ([], r"at least 2 values.*saw 0"),
                       ([torch.randn(8, 4), nan_batch], r"layer '1' at batch 1 has non-finite statistics")):
        with pytest.raises(ValueError, match=match):
            normlab.precise_bn(net, bad)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert int(net[1].num_skipped_updates) == 0  # non-persistent buffers are restored too


def test_precise_then_batch_size_one_eval():
    """After precise_bn, one sample in eval mode is Algorithm 2's transform with the pooled statistics."""
    net = _net(nl.BatchNorm1d).double()
    batches = [torch.randn(16, 4, dtype=torch.float64) for _ in range(3)]
    normlab.precise_bn(net, batches)
    h = torch.cat([net[0](b) for b in batches]).detach()
    net.eval()
    single = torch.randn(1, 4, dtype=torch.float64)
    z = net[0](single)
    want = (z - h.mean(0)) / torch.sqrt(h.var(0) + 1e-5) * net[1].weight + net[1].bias
    torch.testing.assert_close(net[1](z), want)


def test_batches_of_every_kind():
    """Tensors, tuples/lists (first item), dicts (``key=``) and anything through ``input_fn=`` give the same
    statistics; a dict without a key, or a batch of another kind, is refused with a message saying what to pass."""
    xs = [torch.randn(6, 4) * 2 + 1 for _ in range(3)]
    expected = None
    for batches, kw in [
        (xs, {}),
        ([(x, torch.zeros(6)) for x in xs], {}),
        ([[x] for x in xs], {}),
        ([{"image": x, "label": torch.zeros(6)} for x in xs], {"key": "image"}),
        ([{"pixels": {"x": x}} for x in xs], {"input_fn": lambda batch: batch["pixels"]["x"]}),
    ]:
        bn = nl.BatchNorm1d(4)
        normlab.precise_bn(bn, batches, **kw)
        if expected is None:
            expected = bn.running_mean.clone(), bn.running_var.clone()
        torch.testing.assert_close(bn.running_mean, expected[0])
        torch.testing.assert_close(bn.running_var, expected[1])
    torch.testing.assert_close(expected[0], torch.cat(xs).mean(0))
    bn = nl.BatchNorm1d(4)
    before = bn.running_mean.clone()
    with pytest.raises(TypeError, match=r"batch 0 is a dict \(keys \['image'\]\); say which item is the input"):
        normlab.precise_bn(bn, [{"image": xs[0]}])
    with pytest.raises(TypeError, match="batch 0 is a str; expected a tensor, a tuple/list"):
        normlab.precise_bn(bn, ["not a batch"])
    assert torch.equal(bn.running_mean, before)
