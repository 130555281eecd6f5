"""Windowed decoding: decoders that decode overlapping temporal windows of latents and blend their outputs.

Some VAEs carry no cache from one chunk of latents to the next. Their decode
cuts the latents into overlapping windows, decodes each window with a
separate call, and cross-fades the frames where two consecutive windows
overlap (diffusers' `_temporal_tiled_decode` in AutoencoderKLHunyuanVideo,
for example). Such a decode is a chain as well, so it fits the step contract:

- step g decodes window g with the model's own code (`decode_window`);
- the state is what a later window needs from earlier ones: the blend tail
  (the last frames of window g, which the next window fades in from) and the
  latents window g+1 shares with window g;
- step g emits the frames of window g that no later window changes: its head
  blended with the previous tail, then its own frames up to the next overlap.

So the frames equal the model's own windowed decode, not one call over the
whole clip, and `d_trunc=None` gives the exact gradient. A truncation
distance D detaches the state of step g-D: with D=0 the loss of step g sees
neither the previous window's tail nor the latents it shares with it. The
tail itself depends on the latents window g-1 shares with window g-2, so the
exact gradient may need D >= 2 (HunyuanVideo: D=2).

A window that brings no latent frame of its own (a short last window inside
the previous one, as diffusers makes when the count does not divide) is
decoded by the step before it, and windows that contribute no frames at the
end of the clip are not decoded at all.

Another windowed VAE takes a few lines; this is HunyuanVideo's default layout (`docs/vaes.md`):

    adapter = WindowedAdapter(
        lambda z: vae.decoder(vae.post_quant_conv(z)),
        lambda t: strided_windows(t, size=5, stride=3, window_frames=lambda n: 4 * (n - 1) + 1,
                                  keep_first=13, keep=12, blend=4, trim_front=1, num_frames=4 * (t - 1) + 1),
        latent_channels=16, spatial_scale=8, model=vae,
        parameters=[*vae.post_quant_conv.parameters(), *vae.decoder.parameters()])
    loss = chopgrad.pixel_loss(adapter, latents, target, d_trunc=1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from .base import DecodePlan, DecoderAdapter, State, check_latents

#: Latents and frames are (B, C, T, H, W): windows cut them along T.
TIME_DIM = 2


@dataclass(frozen=True)
class Window:
    """One window of a windowed decode.

    Latent frames `start:stop` are decoded in one call. `trim_front` and
    `trim_back` decoded frames are dropped from its ends. Its first `blend`
    frames are then faded in from the last `blend` frames of the previous
    window (fewer if either window is shorter), and its first `keep` frames
    go into the video.
    """

    start: int
    stop: int
    keep: int
    blend: int = 0
    trim_front: int = 0
    trim_back: int = 0


def linear_blend(tail: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Frame x of `e` overlapping frames is tail * (1 - x/e) + head * (x/e), as diffusers' `blend_t`."""
    e = head.shape[TIME_DIM]
    frames = [tail[:, :, x] * (1 - x / e) + head[:, :, x] * (x / e) for x in range(e)]
    return torch.stack(frames, dim=TIME_DIM)


def strided_windows(num_latents: int, *, size: int, stride: int, window_frames: Callable[[int], int], keep: int,
                    keep_first: Optional[int] = None, blend: int = 0, trim_front: int = 0, trim_back: int = 0,
                    num_frames: Optional[int] = None) -> list[Window]:
    """The windows of diffusers' `_temporal_tiled_decode` pattern.

    A window of `size` latent frames starts every `stride` latent frames (the
    last ones are cut at the clip's end); a window of n latent frames decodes
    to `window_frames(n)` frames. Every window after the first drops
    `trim_front` and `trim_back` decoded frames and blends its first `blend`
    frames with the previous window. The first window contributes
    `keep_first` frames (default `keep`), every later one `keep`, and the
    video is cut after `num_frames` frames.
    """
    for name, value in (("size", size), ("stride", stride)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"strided_windows: {name} must be a positive int, got {value!r}")
    windows, emitted = [], 0
    for i, start in enumerate(range(0, num_latents, stride)):
        stop = min(start + size, num_latents)
        front, back = (trim_front, trim_back) if i else (0, 0)
        wanted = keep if i or keep_first is None else keep_first
        count = min(wanted, max(window_frames(stop - start) - front - back, 0))
        if num_frames is not None:
            count = max(min(count, num_frames - emitted), 0)
        windows.append(Window(start, stop, count, blend if i else 0, front, back))
        emitted += count
    return windows


@dataclass(frozen=True)
class _StepLayout:
    """Step g's windows, with latent positions relative to cat(carried latents, latent group)."""

    carried: int  # latent frames the state carries into the step
    new: int  # latent frames of the step's own group
    windows: tuple[Window, ...]
    carry_from: Optional[int]  # where the latents carried to the next step start; None on the last step
    tail: int  # frames of blend tail the next step needs


class WindowedAdapter(DecoderAdapter):
    """A decoder that decodes overlapping windows of latents and blends them, one window per step.

    Args:
        decode_window: `(B, C, n, h, w) latents -> (B, C', f, H, W) frames`, the
            model's own decode of one window (no trimming, no blending).
        windows: `num_latent_frames -> [Window, ...]`, the windows the model's
            own decode uses for a clip of that length, in order: the first
            starts at 0, starts never decrease, every latent frame is in one.
            `strided_windows` gives diffusers' usual pattern.
        latent_channels: channel count (dim 1) of the latents.
        out_channels: channel count of the frames.
        spatial_scale: frame height/width per latent height/width.
        parameters: the parameters `decode_window` uses.
        model: the wrapped module (for its device and hooks), if any.
        clamp_range: (low, high) if the model's own decode clamps its output.
        blend: `(tail, head) -> blended head`, the cross-fade over the
            overlapping frames (default: `linear_blend`).

    The layout depends on the clip length, so a step follows the clip the
    adapter planned last (`plan`); `chopgrad.pixel_loss(vae, ...)` and
    `chopgrad.decode(vae, ...)` make a new adapter per call.
    """

    def __init__(
        self,
        decode_window: Callable[[torch.Tensor], torch.Tensor],
        windows: Callable[[int], Sequence[Window]],
        *,
        latent_channels: int,
        out_channels: int = 3,
        spatial_scale: int = 1,
        parameters: Iterable[torch.nn.Parameter] = (),
        model: Optional[torch.nn.Module] = None,
        clamp_range: Optional[tuple[float, float]] = None,
        blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = linear_blend,
    ):
        for name, fn in (("decode_window", decode_window), ("windows", windows), ("blend", blend)):
            if not callable(fn):
                raise TypeError(f"WindowedAdapter: {name} must be callable, got {type(fn).__name__}")
        for name, value in (("latent_channels", latent_channels), ("out_channels", out_channels),
                            ("spatial_scale", spatial_scale)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WindowedAdapter: {name} must be a positive int, got {value!r}")
        self.decode_window = decode_window
        self.windows = windows
        self.latent_channels = latent_channels
        self.out_channels = out_channels
        self.spatial_scale = spatial_scale
        self._parameters = list(parameters)
        self.model = model
        self.clamp_range = clamp_range
        self.blend = blend
        self._planned: Optional[tuple[int, tuple[_StepLayout, ...]]] = None  # (latent frames, step layouts)

    def plan(self, latents: torch.Tensor) -> DecodePlan:
        check_latents(latents, channels=self.latent_channels)
        b, _, t, h, w = latents.shape
        steps, bounds = self._layout(t)
        self._planned = (t, steps)
        frames = tuple(sum(win.keep for win in s.windows) for s in steps)
        return DecodePlan(bounds, frames, b, self.out_channels, h * self.spatial_scale, w * self.spatial_scale)

    def _layout(self, num_latents: int) -> tuple[tuple[_StepLayout, ...], tuple[int, ...]]:
        windows = _checked_windows(self.windows(num_latents), num_latents)
        # Trailing windows that contribute no frames change nothing.
        while windows[-1].keep == 0:
            windows.pop()
        # A window starts a step when it brings latent frames of its own and frames to the video;
        # any other window is decoded by the step before it.
        runs, stops = [], []
        for win in windows:
            if not runs or (win.stop > stops[-1] and win.keep > 0):
                runs.append([win])
                stops.append(win.stop)
            else:
                runs[-1].append(win)
                stops[-1] = max(stops[-1], win.stop)
        stops[-1] = num_latents
        bounds = (0, *stops)
        # where the latent frames each step needs (carried in its state, then its own group) start
        firsts = [min(run[0].start, stop) for run, stop in zip(runs, bounds)]
        steps = []
        for g, run in enumerate(runs):
            last = g == len(runs) - 1
            origin = firsts[g]
            steps.append(_StepLayout(
                carried=bounds[g] - origin, new=bounds[g + 1] - bounds[g],
                windows=tuple(Window(w.start - origin, w.stop - origin, w.keep, w.blend, w.trim_front, w.trim_back)
                              for w in run),
                carry_from=None if last else firsts[g + 1] - origin,
                tail=0 if last else runs[g + 1][0].blend))
        return tuple(steps), bounds

    def initial_state(self) -> State:
        return [None, None]  # the carried latents, the blend tail

    def step(self, index: int, latent_group: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        layout = self._step_layout(index, latent_group, state)
        carried, tail = state
        z = latent_group if carried is None else torch.cat([carried, latent_group], dim=TIME_DIM)
        pieces = []
        for k, win in enumerate(layout.windows):
            decoded = self.decode_window(z[:, :, win.start:win.stop])
            n = decoded.shape[TIME_DIM]
            if n - win.trim_front - win.trim_back < win.keep:
                raise RuntimeError(f"windowed decode: window {k} of step {index} decoded {n} frames, fewer than its "
                                   f"{win.trim_front} + {win.trim_back} trimmed and {win.keep} kept frames")
            decoded = decoded[:, :, win.trim_front:n - win.trim_back]
            if tail is not None:
                e = min(win.blend, tail.shape[TIME_DIM], decoded.shape[TIME_DIM])
                if e > 0:
                    head = self.blend(tail[:, :, tail.shape[TIME_DIM] - e:], decoded[:, :, :e])
                    decoded = torch.cat([head, decoded[:, :, e:]], dim=TIME_DIM)
            pieces.append(decoded[:, :, :win.keep])
            # the frames the next window fades in from
            tail = decoded[:, :, max(decoded.shape[TIME_DIM] - self._next_blend(layout, k), 0):]
        frames = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=TIME_DIM)
        if layout.carry_from is None:
            return frames, [None, None]
        next_carried = z[:, :, layout.carry_from:] if layout.carry_from < z.shape[TIME_DIM] else None
        # a copy, so that the state does not keep the whole decoded window alive
        next_tail = tail.clone() if layout.tail > 0 else None
        return frames, [next_carried, next_tail]

    @staticmethod
    def _next_blend(layout: _StepLayout, k: int) -> int:
        return layout.windows[k + 1].blend if k + 1 < len(layout.windows) else layout.tail

    def _step_layout(self, index: int, latent_group: torch.Tensor, state: State) -> _StepLayout:
        if self._planned is None:
            raise RuntimeError("WindowedAdapter: call plan(latents) before step: the windows depend on the clip length")
        if not isinstance(state, (list, tuple)) or len(state) != 2:
            raise ValueError(f"windowed decoder state must be [carried latents, blend tail], got {state!r:.80}")
        num_latents, layout = self._planned
        carried = 0 if state[0] is None else state[0].shape[TIME_DIM]
        if (index >= len(layout) or layout[index].new != latent_group.shape[TIME_DIM]
                or layout[index].carried != carried):
            raise ValueError(f"windowed decode: step {index} got {latent_group.shape[TIME_DIM]} new and {carried} "
                             f"carried latent frames, which do not fit the clip of {num_latents} latent frames "
                             f"this adapter planned last (a step follows the last plan: use one adapter per clip "
                             f"length when decoding clips of several lengths at once)")
        return layout[index]

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self._parameters)


def _checked_windows(windows, num_latents: int) -> list[Window]:
    windows = list(windows)
    if not windows or not all(isinstance(w, Window) for w in windows):
        raise TypeError(f"windows({num_latents}) must return a non-empty sequence of chopgrad Window, "
                        f"got {windows!r:.120}")
    covered = 0
    for k, w in enumerate(windows):
        fields = (w.start, w.stop, w.keep, w.blend, w.trim_front, w.trim_back)
        if not all(isinstance(v, int) and v >= 0 for v in fields):
            raise ValueError(f"windows({num_latents}): window {k} has a field that is not a non-negative int: {w}")
        if not w.start < w.stop <= num_latents:
            raise ValueError(f"windows({num_latents}): window {k} must cover latent frames start < stop <= "
                             f"{num_latents}, got {w}")
        if k == 0 and w.start != 0:
            raise ValueError(f"windows({num_latents}): the first window must start at latent frame 0, got {w}")
        if k and w.start < windows[k - 1].start:
            raise ValueError(f"windows({num_latents}): window starts must not decrease, window {k} is {w} after "
                             f"{windows[k - 1]}")
        if w.start > covered:
            raise ValueError(f"windows({num_latents}): latent frames {covered}:{w.start} are in no window")
        covered = max(covered, w.stop)
    if covered != num_latents:
        raise ValueError(f"windows({num_latents}): latent frames {covered}:{num_latents} are in no window")
    if windows[0].keep == 0:
        raise ValueError(f"windows({num_latents}): the first window contributes no frames: {windows[0]}")
    return windows


__all__ = ["TIME_DIM", "Window", "WindowedAdapter", "linear_blend", "strided_windows"]
