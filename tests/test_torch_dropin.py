"""`optserve.torch.RemoteOptimizer` as a torch.optim drop-in: the same numbers as torch.optim.Adam,
in-place write-back, missing gradients, GradScaler, state_dict, bad input (README.md, "PyTorch")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optserve.client import NotFoundError, OptserveError, optim
from optserve.torch import RemoteOptimizer

STEPS = 12


@pytest.fixture(scope="module")
def ckpt_client(tmp_path_factory):
    """A server with a checkpoint directory (state_dict's default maps onto checkpoints)."""
    from tests.conftest import in_process_servers

    with in_process_servers([str(tmp_path_factory.mktemp("ckpt"))]) as (srv,), srv.client(timeout=60.0) as c:
        yield c


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adam_matches_torch_optim_adam_on_fixed_batches(client, model_name):
    local, remote = _net(), _net()
    batches = _batches()
    _train(local, torch.optim.Adam(local.parameters(), lr=1e-2), batches)
    opt = RemoteOptimizer(remote.named_parameters(), client, model_name, optim.adam(1e-2))
    _train(remote, opt, batches)
    assert opt.last_step == STEPS
    for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
        # float32: the same formula, rounded in another order (torch folds the bias corrections into
        # the step size and the denominator)
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "torch_optimizer, spec",
    [
        # the README's table ("PyTorch"): how to match torch's other rules
        (
            lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
            optim.chain(optim.add_decayed_weights(0.1), optim.adam(1e-2)),
        ),
        (lambda p: torch.optim.AdamW(p, lr=1e-2), optim.adamw(1e-2, weight_decay=0.01)),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2), optim.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False)),
    ],
    ids=["adam-l2", "adamw", "rmsprop"],
)
def test_the_readme_spec_matches_each_torch_rule(client, model_name, torch_optimizer, spec):
    local, remote = _net(), _net()
    batches = _batches(6)
    _train(local, torch_optimizer(local.parameters()), batches)
    _train(remote, RemoteOptimizer(remote.named_parameters(), client, model_name, spec), batches)
    for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_step_writes_into_the_same_tensors_and_hooks_see_them(client, model_name):
    net = _net()
    before = {n: (p, p.data_ptr()) for n, p in net.named_parameters()}
    seen = []
    net[2].register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
    opt = RemoteOptimizer(net.named_parameters(), client, model_name, optim.sgd(0.5))
    _train(net, opt, _batches(2))
    for n, p in net.named_parameters():
        assert p is before[n][0] and p.data_ptr() == before[n][1], n
    # the second forward ran on the parameters the first step pulled
    assert not torch.equal(seen[0], seen[1])
    pulled = client.model(model_name).pull()
    np.testing.assert_array_equal(pulled["2.weight"], net[2].weight.detach().numpy())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_parameters_without_a_gradient_are_pushed_as_zeros(client, model_name):
    net = _net()
    frozen = net[0].bias
    frozen.requires_grad_(False)
    start = frozen.detach().clone()
    opt = RemoteOptimizer(net.named_parameters(), client, model_name, optim.adam(1e-2))
    _train(net, opt, _batches(3))
    # a parameter that never had a gradient: Adam's zero moments leave it where it was
    assert frozen.grad is None and torch.equal(frozen.detach(), start)
    assert opt.last_step == 3


def test_grad_scaler_unscales_and_skips_steps_with_inf(client, model_name):
    net, ref = _net(), _net()
    opt = RemoteOptimizer(net.named_parameters(), client, model_name, optim.sgd(0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    (x, y), _ = _batches(2)
    for model, o, s in ((net, opt, scaler), (ref, ref_opt, None)):
        o.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if s is None:
            loss.backward()
            o.step()
        else:
            s.scale(loss).backward()
            s.step(o)
            s.update()
    assert opt.last_step == 1
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-6, atol=1e-7)
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(net(x), y)).backward()
    net[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # found an inf: no push
    scaler.update()
    assert client.model(model_name).step == 1 and scaler.get_scale() < 1024.0


def test_a_second_optimizer_on_the_same_model_takes_the_servers_parameters(client, model_name):
    first, second = _net(0), _net(7)
    RemoteOptimizer(first.named_parameters(), client, model_name, optim.sgd(0.1))
    RemoteOptimizer(second.named_parameters(), client, model_name, optim.sgd(0.1))  # exists: attach
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("state", ["checkpoint", "download"])
def test_state_dict_round_trip(ckpt_client, model_name, state):
    net = _net()
    opt = RemoteOptimizer(net.named_parameters(), ckpt_client, model_name, optim.adam(1e-2), state=state)
    batches = _batches(6)
    _train(net, opt, batches[:3])
    saved = opt.state_dict()
    torch.save(saved, _buffer := __import__("io").BytesIO())
    at_save = [p.detach().clone() for p in net.parameters()]
    _train(net, opt, batches[3:])
    after = [p.detach().clone() for p in net.parameters()]
    _buffer.seek(0)
    opt.load_state_dict(torch.load(_buffer, weights_only=False))
    for a, b in zip(at_save, net.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    _train(net, opt, batches[3:])  # the optimizer state came back too: the same three steps again
    for a, b in zip(after, net.parameters(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.detach().numpy())


def test_bad_input_is_refused_with_the_model_and_leaf_named(client, model_name):
    with pytest.raises(NotFoundError, match=model_name):
        RemoteOptimizer(_net().named_parameters(), client, model_name)  # no spec, no model
    RemoteOptimizer(_net().named_parameters(), client, model_name, optim.sgd(0.1))
    wider = torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    with pytest.raises((OptserveError, ValueError, TypeError), match=r"model .* leaf '0\.(bias|weight)'"):
        RemoteOptimizer(wider.named_parameters(), client, model_name, optim.sgd(0.1))
    opt = RemoteOptimizer(_net().named_parameters(), client, model_name)
    with pytest.raises(ValueError, match="not a RemoteOptimizer state_dict"):
        opt.load_state_dict(torch.optim.SGD(_net().parameters(), lr=0.1).state_dict())


def test_tensors_that_are_not_their_own_host_array_are_staged_and_copied_back(client, model_name):
    """The path CUDA tensors take (a host staging tensor, copied back in place), on the CPU with a
    non-contiguous parameter; plain tensors in param groups are named by position."""
    w = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(4, 3).t())  # (3, 4), not contiguous
    b = torch.nn.Parameter(torch.zeros(3))
    ptr = w.data_ptr()
    opt = RemoteOptimizer([{"params": [w, b], "lr": 123.0}], client, model_name, optim.sgd(0.5))
    assert opt.names == ["0", "1"] and not w.is_contiguous()
    w.grad, b.grad = torch.ones(3, 4), torch.ones(3)
    opt.step()
    expected = torch.arange(12, dtype=torch.float32).reshape(4, 3).t() - 0.5
    assert w.data_ptr() == ptr and torch.equal(w.detach(), expected)
    np.testing.assert_array_equal(client.model(model_name).pull()["0"], expected.numpy())


def test_optimizers_created_at_once_all_attach_to_one_model(client, model_name):
    """Workers starting together: one creates, the others wait for the model it is creating."""
    import threading

    nets = [_net(seed) for seed in range(4)]
    errors: list[BaseException] = []

    def start(net: torch.nn.Module) -> None:
        try:
            RemoteOptimizer(net.named_parameters(), client, model_name, optim.sgd(0.1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(net,)) for net in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for net in nets[1:]:
        for a, b in zip(nets[0].parameters(), net.parameters(), strict=True):
            assert torch.equal(a, b)
