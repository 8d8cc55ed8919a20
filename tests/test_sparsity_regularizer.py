"""Group lasso: penalty value by hand, gradient against finite differences, the proximal operator's
exact zeros and shrink, untouched heads, finalize, warm-up and the cross-rank zero-mask check."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from training.models import EncoderConfig, HeadConfig, ModelConfig, StageConfig, build_model, create_model
from training.sparsity import (
    GroupLasso,
    GroupSet,
    build_groups,
    check_same_across_ranks,
    zero_mask,
    zero_mask_digest,
)
from training.sparsity.regularizer import raise_if_ranks_differ
from training.tasks import TaskSpec

SEG = TaskSpec("seg", "segmentation", 5)
ATTR = TaskSpec("attr", "attributes", 2, ("Male", "Smiling"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _micro(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Stem 7x7 3->4, one basic block 4->2->4 on the stem's stream: two spaces, hand-countable.

    stream (4 groups): stem filter 3*49 + BN 2 + conv2 filter 2*9 + BN 2 + conv1 input slice 2*9 = 187
    inner  (2 groups): conv1 filter 4*9 + BN 2 + conv2 input slice 4*9 = 74
    """
    torch.manual_seed(0)
    encoder = EncoderConfig(
        block="basic", stem=(4,), stages=(StageConfig(out=4, blocks=((2,),)),), stem_pool=False
    )
    model = build_model(ModelConfig(encoder=encoder, heads=(HeadConfig(SEG, "light", (3,)),)))
    return model.to(dtype)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model(encoder="tiny", tasks=(SEG, ATTR), head="light", head_width=8)


def _head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.heads.state_dict().items()}


def test_group_sizes_and_penalty_by_hand() -> None:
    model = _micro()
    gs = build_groups(model)
    assert {n: (s.width, gs.group_size(n)) for n, s in gs.spaces.items()} == {
        "stages.0 (stream)": (4, 187),
        "stages.0.0.conv1": (2, 74),
    }
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.fill_(1.0)
    # all ones: ||W_g|| = sqrt(|g|), so the penalty is lam * sum_g |g|
    reg = GroupLasso(gs, lam=0.01)
    assert reg.penalty().item() == pytest.approx(0.01 * (4 * 187 + 2 * 74), rel=1e-6)


def _penalty_by_loop(gs: GroupSet, lam: float, model: nn.Module) -> torch.Tensor:
    """The formula evaluated group by group, independently of the vectorised code."""
    total = torch.zeros((), dtype=torch.float64)
    for g in gs.groups():
        sq = sum(model.get_parameter(s.name).select(s.dim, g.index).double().pow(2).sum() for s in g.slices)
        total = total + math.sqrt(g.size) * sq.sqrt()
    return lam * total


@pytest.mark.parametrize("mode", ["channel", "paper"])
def test_penalty_matches_group_by_group_loop(mode: str) -> None:
    model = _tiny()
    gs = build_groups(model, mode)
    reg = GroupLasso(gs, lam=1e-3)
    with torch.no_grad():
        expected = _penalty_by_loop(gs, 1e-3, model)
    assert reg.penalty().double().item() == pytest.approx(expected.item(), rel=1e-5)


def test_penalty_gradient_matches_finite_differences() -> None:
    model = _micro(torch.float64)
    gs = build_groups(model)
    reg = GroupLasso(gs, lam=0.3)
    with torch.no_grad():  # one zero group: its gradient must be 0, not NaN
        for s in gs.slices("stages.0.0.conv1"):
            model.get_parameter(s.name).select(s.dim, 1).zero_()
    params = dict(model.encoder.named_parameters())
    grads = torch.autograd.grad(reg.penalty(), list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    grad = dict(zip(params, grads, strict=True))
    assert grad["stages.0.0.conv1.weight"][1].eq(0).all()
    assert grad["stages.0.0.bn1.bias"][1] == 0
    gen = torch.Generator().manual_seed(0)
    for name, p in params.items():
        for _ in range(3):
            i = int(torch.randint(p.numel(), (1,), generator=gen))
            if p.view(-1)[i] == 0:
                continue
            eps = 1e-6
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = reg.penalty().item()
                p.view(-1)[i] -= 2 * eps
                down = reg.penalty().item()
                p.view(-1)[i] += eps
            assert grad[name].view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_penalty_gradient_formula_on_overlapping_groups() -> None:
    """d/dW of lam*sqrt|g|*||W_g|| summed over the (two) groups holding each conv weight."""
    model = _micro(torch.float64)
    gs = build_groups(model)
    reg = GroupLasso(gs, lam=0.5)
    norms = reg.group_norms()
    w = model.encoder.stages[0][0].conv1.weight  # producer of the inner space, consumer of the stream
    (g,) = torch.autograd.grad(reg.penalty(), [w])
    a = math.sqrt(74) / norms["stages.0.0.conv1"]
    b = math.sqrt(187) / norms["stages.0 (stream)"]
    torch.testing.assert_close(g, 0.5 * (a.view(-1, 1, 1, 1) + b.view(1, -1, 1, 1)) * w.detach())


def test_proximal_step_in_paper_mode_is_the_exact_group_soft_threshold() -> None:
    model = _tiny()
    gs = build_groups(model, "paper")
    lam, lr = 2e-3, 0.5
    reg = GroupLasso(gs, lam=lam)
    with torch.no_grad():  # push a few groups under the threshold
        model.encoder.stages[2][0].conv1.weight[:, :5].mul_(1e-3)
    before, heads = reg.group_norms(), _head_state(model)
    reg.proximal_step(lr)
    after = reg.group_norms()
    zeros = reg.zero_mask()
    for name in gs.spaces:
        threshold = lr * lam * math.sqrt(gs.group_size(name))
        expected = (before[name] - threshold).clamp_min(0)
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-7)
        assert torch.equal(zeros[name], before[name] <= threshold)
    assert zeros["stages.2.0.conv1:in"][:5].all() and not zeros["stages.2.0.conv1:in"][5:].any()
    assert all(torch.equal(v, heads[k]) for k, v in model.heads.state_dict().items())


def test_proximal_step_single_space_shrinks_by_exactly_the_threshold() -> None:
    """A channel-mode space on its own (no overlapping group): each norm drops by lr*lam*sqrt|g|."""
    model = _tiny()
    full = build_groups(model)
    name = "stages.1 (stream)"
    one = GroupSet(
        "channel",
        full.graph,
        {name: full.spaces[name]},
        {name: full.slices(name)},
        dict(model.named_parameters()),
    )
    lam, lr = 1e-2, 0.1
    reg = GroupLasso(one, lam=lam)
    before = reg.group_norms()[name]
    reg.proximal_step(lr)
    after = reg.group_norms()[name]
    threshold = lr * lam * math.sqrt(one.group_size(name))
    assert before.min() > threshold
    torch.testing.assert_close(before - after, torch.full_like(before, threshold), rtol=1e-4, atol=1e-6)


def test_proximal_step_channel_mode_zeros_and_factors() -> None:
    """Overlapping channel groups: each weight is scaled by the factors of all groups holding it,
    computed from the norms before the step; groups under the threshold end exactly zero."""
    model = _tiny()
    gs = build_groups(model)
    lam, lr = 1e-3, 1.0
    reg = GroupLasso(gs, lam=lam)
    with torch.no_grad():
        for s in gs.slices("stages.2.0.conv1"):
            model.get_parameter(s.name).select(s.dim, 4).mul_(1e-4)
        for s in gs.slices("stages.2 (stream)"):
            model.get_parameter(s.name).select(s.dim, 9).mul_(1e-4)
    norms, heads = reg.group_norms(), _head_state(model)
    w_old = model.encoder.stages[2][0].conv2.weight.detach().clone()  # stream producer, inner consumer
    reg.proximal_step(lr)
    factor = {n: (1 - lr * lam * math.sqrt(gs.group_size(n)) / v).clamp_min(0) for n, v in norms.items()}
    expected = (
        w_old * factor["stages.2 (stream)"].view(-1, 1, 1, 1) * factor["stages.2.0.conv1"].view(1, -1, 1, 1)
    )
    torch.testing.assert_close(model.encoder.stages[2][0].conv2.weight, expected, rtol=1e-6, atol=0)
    zeros = reg.zero_mask()
    assert {n: z.nonzero().flatten().tolist() for n, z in zeros.items() if z.any()} == {
        "stages.2.0.conv1": [4],
        "stages.2 (stream)": [9],
    }
    assert all(torch.equal(v, heads[k]) for k, v in model.heads.state_dict().items())


def test_proximal_step_is_cheap_noop_without_lambda_or_lr() -> None:
    model = _tiny()
    reg = GroupLasso(build_groups(model), lam=0.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reg.proximal_step(0.1)
    GroupLasso(build_groups(model), lam=1.0).proximal_step(0.0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_finalize_zeroes_groups_under_tolerance() -> None:
    model = _tiny()
    gs = build_groups(model)
    reg = GroupLasso(gs, lam=1e-4, mode="penalty", tolerance=1e-6)
    with torch.no_grad():
        for s in gs.slices("stages.3.0.conv1"):
            model.get_parameter(s.name).select(s.dim, 2).fill_(1e-9)
        for s in gs.slices("stages.3.0.conv1"):
            model.get_parameter(s.name).select(s.dim, 3).zero_()
    assert not reg.zero_mask()["stages.3.0.conv1"][2]
    heads = _head_state(model)
    assert reg.finalize() == 1  # group 3 was already exactly zero
    zeros = reg.zero_mask()
    assert zeros["stages.3.0.conv1"].nonzero().flatten().tolist() == [2, 3]
    assert sum(int(z.sum()) for z in zeros.values()) == 2
    assert all(torch.equal(v, heads[k]) for k, v in model.heads.state_dict().items())
    assert reg.finalize() == 0


def test_zero_mask_is_exact_even_when_squares_underflow() -> None:
    model = _tiny()
    gs = build_groups(model)
    with torch.no_grad():
        for s in gs.slices("stages.0.0.conv1"):
            model.get_parameter(s.name).select(s.dim, 0).fill_(1e-30)  # 1e-60 underflows in float32
    reg = GroupLasso(gs, lam=1.0)
    assert reg.group_norms()["stages.0.0.conv1"][0] == 0
    assert not reg.zero_mask()["stages.0.0.conv1"][0]


def test_active_loss_term_and_after_step_follow_mode_and_warmup() -> None:
    model = _tiny()
    gs = build_groups(model)
    prox = GroupLasso(gs, lam=1e-3, mode="proximal", warmup_epochs=2)
    assert [prox.active(e) for e in range(4)] == [False, False, True, True]
    assert prox.loss_term(5) is None
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prox.after_step(0.1, epoch=1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    prox.after_step(0.1, epoch=2)
    assert not torch.equal(model.encoder.stem[0].conv.weight, state["encoder.stem.0.conv.weight"])
    pen = GroupLasso(gs, lam=1e-3, mode="penalty")
    assert pen.loss_term(0) is not None and pen.loss_term(0).requires_grad
    assert not GroupLasso(gs, lam=0.0).active(10)
    with pytest.raises(ValueError, match="proximal.*penalty"):
        GroupLasso(gs, lam=1e-3, mode="prox")


def test_from_config() -> None:
    from training.config import SparsityConfig

    reg = GroupLasso.from_config(
        build_groups(_tiny()), SparsityConfig(lam=1e-4, mode="penalty", warmup_epochs=3)
    )
    assert (reg.lam, reg.mode, reg.warmup_epochs, reg.tolerance) == (1e-4, "penalty", 3, 1e-6)


def test_zero_mask_digest_is_stable_and_sensitive() -> None:
    a = {"x": torch.tensor([True, False]), "y": torch.tensor([False])}
    b = {"y": torch.tensor([False]), "x": torch.tensor([True, False])}
    c = {"x": torch.tensor([False, True]), "y": torch.tensor([False])}
    assert zero_mask_digest(a) == zero_mask_digest(b) != zero_mask_digest(c)
    assert 0 <= zero_mask_digest(a) < 2**63
    # fixed across processes and versions: sha256 of "name\0numel\0" + one byte per bit, sorted by name
    raw = b"x\x002\x00\x01\x00" + b"y\x001\x00\x00"
    assert zero_mask_digest(a) == int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") >> 1


def test_rank_check_names_the_ranks_that_differ() -> None:
    raise_if_ranks_differ([7, 7, 7])
    with pytest.raises(RuntimeError, match=r"ranks \[1, 3\]"):
        raise_if_ranks_differ([7, 8, 7, 9])


def test_check_same_across_ranks(tmp_path, monkeypatch) -> None:
    """Without a process group nothing is gathered; with one, every rank's digest of its zero mask
    is gathered and compared (one rank here: its own digest, which agrees with itself)."""
    import training.sparsity.regularizer as regularizer

    gs = build_groups(_tiny())
    compared: list[list[int]] = []
    real = regularizer.raise_if_ranks_differ
    monkeypatch.setattr(regularizer, "raise_if_ranks_differ", lambda d: (compared.append(d), real(d)))
    check_same_across_ranks(gs)  # no process group: nothing to compare
    assert compared == []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        check_same_across_ranks(gs)
    finally:
        dist.destroy_process_group()
    assert compared == [[zero_mask_digest(zero_mask(gs))]]


def _rank_worker(rank: int, path: str) -> None:
    """Two gloo ranks; rank 1 zeroes one more group, so both must raise naming rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/pg", rank=rank, world_size=2)
    try:
        model = _micro()
        gs = build_groups(model)
        check_same_across_ranks(gs)  # identical models agree
        if rank == 1:
            with torch.no_grad():
                for s in gs.slices("stages.0.0.conv1"):
                    model.get_parameter(s.name).select(s.dim, 0).zero_()
        try:
            check_same_across_ranks(gs)
            message = "no error"
        except RuntimeError as err:
            message = str(err)
        with open(f"{path}/rank{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_check_same_across_two_ranks(tmp_path) -> None:
    torch.multiprocessing.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2)
    for rank in (0, 1):
        assert "ranks [1] disagree" in (tmp_path / f"rank{rank}.txt").read_text()


def test_cooldown_holds_zero_groups_and_lets_the_rest_train() -> None:
    """In the cool-down the proximal step is off; groups zero before an optimizer step are zero
    after it, every other weight moves exactly as the optimizer moved it."""
    from training.config import SparsityConfig

    model = _tiny()
    gs = build_groups(model)
    reg = GroupLasso.from_config(gs, SparsityConfig(lam=1e-3, warmup_epochs=1, cooldown_epochs=2), epochs=6)
    assert [reg.active(e) for e in range(6)] == [False, True, True, True, False, False]
    assert [reg.holding(e) for e in range(6)] == [False] * 4 + [True] * 2
    space = "stages.0.0.conv1"
    with torch.no_grad():  # zero group 0 of the block's inner channel: its producer and consumer slices
        for s in gs.slices(space):
            model.get_parameter(s.name).select(s.dim, 0).zero_()
    assert reg.zero_mask()[space][0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in (3, 4):  # last sparsifying epoch, first cool-down epoch
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        model(torch.rand(2, 3, 32, 32))["seg"].square().mean().backward()
        reg.before_step(epoch)
        optimizer.step()
        stepped = {n: p.detach().clone() for n, p in model.named_parameters()}
        reg.after_step(0.1, epoch)
        assert reg.zero_mask()[space][0], epoch  # zero in both phases (prox keeps a zero group zero)
        if epoch == 4:
            others = [n for n, p in model.named_parameters() if torch.equal(p.detach(), stepped[n])]
            grouped = {s.name for s in gs.slices(space)}
            assert set(before) - set(others) <= grouped  # only the held slices were touched
            assert not reg.zero_mask()[space][1:].any()  # nothing else was zeroed
    with pytest.raises(ValueError, match="cool-down"):
        GroupLasso.from_config(gs, SparsityConfig(lam=1e-3, warmup_epochs=3, cooldown_epochs=3), epochs=6)
