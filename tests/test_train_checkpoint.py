"""Checkpoints: a run resumed from one continues bit for bit as the uninterrupted run."""
import pytest
import torch

from chopgrad.tools.train.checkpoint import load_checkpoint, save_checkpoint


def make_run():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Dropout(0.3), torch.nn.Linear(7, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        x = torch.randn(4, 5)  # the data order comes from the random state too
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_resume_is_bit_identical(tmp_path):
    model, optimizer, scheduler = make_run()
    train(model, optimizer, scheduler, 3)
    save_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, scheduler=scheduler, step=3,
                    extra={"task": "vsr"})
    train(model, optimizer, scheduler, 4)
    expected = [p.detach().clone() for p in model.parameters()]

    model, optimizer, scheduler = make_run()
    torch.manual_seed(123)  # whatever happened before resuming
    state = load_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, scheduler=scheduler)
    assert state == {"step": 3, "extra": {"task": "vsr"}}
    train(model, optimizer, scheduler, 4)
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)


def test_incomplete_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = make_run()
    save_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, step=0)
    with pytest.raises(ValueError, match="no learning-rate schedule"):
        load_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, scheduler=scheduler)
    (tmp_path / "ckpt" / "random.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks random.safetensors"):
        load_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer)


def test_trainable_only_keeps_the_trainable_weights_and_refuses_another_trainable_set(tmp_path):
    from safetensors.torch import load_file

    model, _, _ = make_run()
    model[0].requires_grad_(False)  # a frozen base, reloaded from elsewhere
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    save_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, step=1, trainable_only=True)
    assert set(load_file(str(tmp_path / "ckpt" / "model.safetensors"))) == {"2.weight", "2.bias"}

    trained = {"2.weight": model[2].weight.detach().clone(), "2.bias": model[2].bias.detach().clone()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    moved = [p.detach().clone() for p in model[0].parameters()]
    load_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, trainable_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    # the frozen part is left as it is now: the checkpoint does not hold it
    assert all(torch.equal(p, m) for p, m in zip(model[0].parameters(), moved))
    assert not any(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))

    model[0].requires_grad_(True)  # a run that trains more than the checkpoint holds
    with pytest.raises(ValueError, match=r"does not hold this run's trainable weights \(missing \['0.bias'"):
        load_checkpoint(str(tmp_path / "ckpt"), model=model, optimizer=optimizer, trainable_only=True)
