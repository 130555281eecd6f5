"""benchmarks/gpu_train_step.py at a tiny size on the CPU, so the GPU run cannot rot; and its split backward."""
import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from script_loader import load_script

import chopgrad

pytest.importorskip("peft", reason="the LoRA adapter needs peft")


def test_tiny_run_writes_a_row_per_size(tmp_path):
    script = load_script("gpu_train_step", folder="benchmarks")
    results = tmp_path / "RESULTS.md"
    assert script.main(["--tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "0", "--out",
                        str(tmp_path / "out"), "--results", str(results)]) == 0
    record = json.loads((tmp_path / "out" / "train_step.json").read_text())
    rows = record["rows"]
    assert [r["size"] for r in rows] == ["x".join(map(str, size)) for size in script.TINY_SIZES]
    assert all(r["status"] == "ok" and r["step_s"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert record["weights"]["lora"] > 0 and record["weights"]["transformer"] > 0 and record["weights"]["vae"] > 0
    assert all(r["step_peak_bytes"] is None for r in rows)  # no allocator peak on the CPU: shown as "-"
    table = results.read_text()
    assert "## GPU training step" in table and "(tiny CPU check)" in table and table.count("| ok |") == len(rows)


def test_the_split_backward_gives_the_gradient_of_one_backward():
    """The benchmark measures the decoder's and the transformer's parts of the backward apart; the LoRA gradient
    must be the one a single backward of the whole loss gives (what the trainer runs)."""
    script = load_script("gpu_train_step", folder="benchmarks")
    args = SimpleNamespace(tiny=True, dtype="fp32")
    restorer, vae, lora, _ = script.build(args, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at zero: give the adapter a gradient path through A too
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    from chopgrad.tools.bench.workloads import latent_shape

    shape = latent_shape(vae, 9, 16, 16)
    condition, target_latents = torch.randn(shape), torch.randn(shape)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    frozen = torch.optim.SGD(lora, lr=0.0)
    script.train_step(restorer, vae, frozen, condition, video, target_latents, nullcontext)
    split = [p.grad.clone() for p in lora]

    for p in lora:
        p.grad = None
    latents = restorer(condition)
    loss = F.mse_loss(latents.float(), target_latents) + chopgrad.pixel_loss(vae, latents, video, d_trunc=1)
    loss.backward()
    assert any(float(g.abs().max()) > 0 for g in split)
    for got, p in zip(split, lora):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)
