"""The worked examples of docs/video_losses.md run as shipped (default arguments, default model, CPU)."""
import math

from script_loader import load_script


def test_temporal_consistency_example_trains_through_decode(capsys):
    result = load_script("temporal_consistency", folder="examples").main([])
    losses = result["losses"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # d_trunc=1 on the trained default model: close to the exact gradient
    assert result["cosine"] > 0.9
    assert "step 7: loss" in capsys.readouterr().out


def test_video_critic_example_raises_the_reward(capsys):
    result = load_script("video_critic", folder="examples").main([])
    rewards = result["rewards"]
    assert len(rewards) == 8 and all(math.isfinite(v) for v in rewards)
    assert result["final_reward"] > rewards[0]
    assert "reward" in capsys.readouterr().out
