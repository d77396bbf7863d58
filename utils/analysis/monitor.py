"""Measurements of the AdamBNN paper, taken during training (definitions: docs/analysis.md).

`TrainingMonitor` watches the binary convolutions (`models.binary.BinaryConv2d`) of the student:
their latent weights W, the gradients, the optimizer's effective step, and the inputs of their
binarizers. It works only on *measured* iterations (every `every`-th one); on the others its
forward pre-hooks return at once and nothing is copied. The training loop calls

    monitor.start_iteration(it)   # before the forward pass
    ...forward, backward...
    monitor.before_step()         # the gradients are there, the weights are still W_t
    optimizer.step()
    monitor.after_step()          # the weights are W_t+1

then once per epoch `monitor.epoch_metrics()` (a flat dict of floats; resets the accumulators)
and `monitor.close()` at the end. Every fraction is over elements: a network-wide value weights
each layer by its size. A measured iteration costs a few passes over the binary weights (bool
snapshots and masks, reused buffers, no float copy of W); the rest costs nothing.

The sign of a latent weight is taken as W > 0 (W = 0 counts as negative; an exact zero does not
occur in practice and the network's sign(0) = 0 is not a third state worth tracking).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from models import reactnet_a
from models.binary import BinaryConv2d
from utils.checkpoint import load_weights

__all__ = [
    "TrainingMonitor", "c2i_reference", "sign_flip_fraction", "sign_change_fraction", "saturation_fraction",
    "dead_fraction", "latent_gt1_fraction", "effective_step", "binary_convs",
    "DEAD_TOL", "WEAK_REL", "REVIVE_REL",
]

# A gradient with |g| <= DEAD_TOL is "dead": exactly (or numerically) zero.
DEAD_TOL = 1e-12
# A gradient with |g| <= WEAK_REL * (mean |g| of its layer) is "weak" (dead ones included).
WEAK_REL = 1e-2
# A dead/weak weight is "revived" when its step is >= REVIVE_REL * (mean |step| of its layer).
REVIVE_REL = 0.1
# Elements per layer and measured iteration kept for the quantile summaries.
SAMPLE_PER_LAYER = 2048


# --------------------------------------------------------------------------------------------
# The metrics on plain tensors (tests/test_analysis.py checks them on hand-made tensors)
# --------------------------------------------------------------------------------------------

def sign_flip_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    """FF ratio of one step: the fraction of weights whose sign differs between `before` (W_t)
    and `after` (W_t+1): sum |sign(W_t+1) - sign(W_t)| / 2 / N."""
    return torch.count_nonzero((before > 0) ^ (after > 0)).item() / before.numel()


def sign_change_fraction(reference: torch.Tensor, current: torch.Tensor) -> float:
    """C2I ratio: the fraction of weights whose sign differs from their sign in `reference`."""
    return sign_flip_fraction(reference, current)


def saturation_fraction(u: torch.Tensor) -> float:
    """The fraction of binarizer inputs with |u| >= 1, where the ApproxSign gradient is zero."""
    return torch.count_nonzero(u.detach().abs() >= 1).item() / u.numel()


def dead_fraction(grad: torch.Tensor, tol: float = DEAD_TOL) -> float:
    """The fraction of gradient entries with |g| <= tol."""
    return torch.count_nonzero(grad.detach().abs() <= tol).item() / grad.numel()


def latent_gt1_fraction(w: torch.Tensor) -> float:
    """The fraction of latent weights with |W| > 1 (the straight-through gradient is 0 there)."""
    return torch.count_nonzero(w.detach().abs() > 1).item() / w.numel()


def _is_adam(optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _group_of(optimizer, param):
    for g in optimizer.param_groups:
        if any(p is param for p in g["params"]):
            return g
    return None


@torch.no_grad()
def effective_step(optimizer: torch.optim.Optimizer, param: torch.Tensor, group=None,
                   out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The update the optimizer has just applied to `param` (call after optimizer.step()), a
    tensor of its shape, sign included:

    - Adam / AdamW: -lr * m_hat / (sqrt(v_hat) + eps), bias-corrected as torch does
      (`max_exp_avg_sq` with amsgrad). Adam's coupled L2 decay is part of it (it enters the
      moments through the gradient); AdamW's decoupled shrink -lr*wd*W is not.
    - SGD: -lr * momentum_buffer (heavy ball); with nesterov or without momentum
      -lr * (g + wd*W [+ momentum*buf]), W being the updated weights (a tiny difference).

    None for other optimizers or a parameter without optimizer state. `out` is an optional
    float32 buffer of the parameter's shape to write into.
    """
    group = group if group is not None else _group_of(optimizer, param)
    if group is None:
        return None
    state = optimizer.state.get(param, {})
    lr = float(group["lr"])
    sign = 1.0 if group.get("maximize") else -1.0
    if _is_adam(optimizer):
        if "exp_avg" not in state:
            return None
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(state["step"])
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = torch.sqrt(v, out=out) if out is not None else v.sqrt()
        step.div_(math.sqrt(bc2)).add_(float(group["eps"]))
        torch.div(state["exp_avg"], step, out=step)
        return step.mul_(sign * lr / bc1)
    if isinstance(optimizer, torch.optim.SGD):
        buf = state.get("momentum_buffer")
        momentum = float(group.get("momentum") or 0)
        if momentum and buf is not None and not group.get("nesterov"):
            d = buf
        else:
            if param.grad is None:
                return None
            d = param.grad + float(group.get("weight_decay") or 0) * param.detach()
            if momentum and buf is not None:
                d = d + momentum * buf
        if out is not None:
            return torch.mul(d, sign * lr, out=out)
        return d * (sign * lr)
    return None


def live_taps(kernel_size, stride, padding, input_hw) -> torch.Tensor | None:
    """[kh, kw] bool mask of the kernel taps that meet at least one real input pixel (not only zero
    padding) for an input of spatial size `input_hw`; None when every tap does. At small inputs
    (e.g. 32x32: the last stage runs at 1x1) the border taps of a 3x3 conv see only padding, so
    their gradient is zero whatever the optimizer: structurally dead, not the paper's dead."""
    live = []
    for k, s, p, n in zip(_two(kernel_size), _two(stride), _two(padding), input_hw):
        out = (n + 2 * p - k) // s + 1
        live.append([any(0 <= o * s - p + t < n for o in range(out)) for t in range(k)])
    mask = torch.tensor(live[0]).view(-1, 1) & torch.tensor(live[1]).view(1, -1)
    return None if bool(mask.all()) else mask


def _two(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def binary_convs(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    """(name, module) of every BinaryConv2d in model order; a DDP/DataParallel wrapper is unwrapped,
    so names have no 'module.' prefix."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]


def _reference_tensor(reference: dict, name: str) -> torch.Tensor:
    for key in (f"{name}.weight", name, f"module.{name}.weight", f"module.{name}"):
        if key in reference:
            return reference[key]
    raise KeyError(f"TrainingMonitor: the reference weights have no entry for binary conv "
                   f"'{name}' (looked for '{name}.weight' and '{name}'); pass the initial "
                   f"state_dict of the student (for step 2: of the step-1 checkpoint)")


# --------------------------------------------------------------------------------------------
# The monitor
# --------------------------------------------------------------------------------------------

_COUNTS = ("ff", "ff_n", "sat", "sat_n", "dead", "weak", "grad_n", "dead_rev", "weak_rev",
           "dead_s", "weak_s", "step_n")
_SUMS = ("grad_abs", "step_abs", "dead_step", "weak_step")


class TrainingMonitor:
    """FF, C2I, activation saturation, dead weights, effective step and |W| > 1 of the binary
    convolutions of `model`, measured every `every` iterations.

    model:     the (unwrapped) student; a DDP wrapper is unwrapped here too.
    optimizer: its optimizer (Adam/AdamW/SGD give the effective-step statistics; None: no step stats).
    every:     measure iterations with it % every == 0; must be > 0 (0 means: do not create one).
    reference: {name: tensor} of the latent weights C2I is measured against (a state_dict is fine:
               '<conv>.weight' keys). None takes the weights as they are now: construct the
               monitor before a resume overwrites the initial weights, or pass them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, every: int,
                 reference: dict | None = None, dead_tol: float = DEAD_TOL):
        if every <= 0:
            raise ValueError("TrainingMonitor needs every > 0 (every = 0 means: do not create one)")
        self.optimizer = optimizer
        self.every = int(every)
        self.dead_tol = float(dead_tol)
        self.layers = binary_convs(model)
        if not self.layers:
            raise ValueError("TrainingMonitor: the model has no BinaryConv2d layers to monitor")
        self._ref = {}
        for name, m in self.layers:
            ref = m.weight if reference is None else _reference_tensor(reference, name)
            ref = ref.detach()
            if ref.shape != m.weight.shape:
                if ref.numel() != m.weight.numel():
                    raise ValueError(f"TrainingMonitor: the reference of '{name}' has shape "
                                     f"{tuple(ref.shape)}, the layer {tuple(m.weight.shape)}")
                ref = ref.reshape(m.weight.shape)
            self._ref[name] = ref.to(m.weight.device) > 0
        # Taps that see only zero padding at the input size met in training (see live_taps):
        # {name: [1, 1, kh, kw] bool mask or None}, and the number of weights outside them.
        self._live = {name: None for name, _ in self.layers}
        self._live_hw = {}
        self._sample_idx = {}
        self._n_live = {name: m.weight.numel() for name, m in self.layers}
        self._active = False
        self._closed = False
        self._seen_inputs: set = set()
        self._snap: dict = {}
        self._buffers: dict = {}
        self._hooks = [m.register_forward_pre_hook(self._make_hook(name)) for name, m in self.layers]
        self._reset()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _reset(self):
        # Per layer: integer counts and float32 sums as 0-d tensors on the weights' device, so a
        # measured iteration never synchronizes with the device.
        self._acc = {}
        for name, m in self.layers:
            dev = m.weight.device
            self._acc[name] = {**{k: torch.zeros((), dtype=torch.int64, device=dev) for k in _COUNTS},
                               **{k: torch.zeros((), dtype=torch.float64, device=dev) for k in _SUMS}}
        dev = self.layers[0][1].weight.device
        self._net_sat = torch.zeros(2, dtype=torch.int64, device=dev)
        self._measured = 0
        self._samples = {"grad_abs": [], "step_abs": []}

    def _buffer(self, key, like: torch.Tensor, dtype) -> torch.Tensor:
        """A reusable buffer shaped like `like` (allocating and first-touching big tensors costs
        more than the arithmetic): a view of one flat tensor per (key, dtype) that grows as needed."""
        slot = (key, dtype, like.device)
        flat = self._buffers.get(slot)
        if flat is None or flat.numel() < like.numel():
            flat = self._buffers[slot] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return flat[: like.numel()].view(like.shape)

    @property
    def measuring(self) -> bool:
        """True from start_iteration() of a measured iteration until its after_step()."""
        return self._active

    def _make_hook(self, name):
        def hook(module, args):
            if not self._active or not module.training:
                return None
            with torch.no_grad():
                u = args[0]
                hw = tuple(u.shape[-2:])
                if self._live_hw.get(name) != hw:
                    self._set_live(name, module, hw)
                sat = torch.count_nonzero(u.detach().abs() >= 1)
                acc = self._acc[name]
                acc["sat"] += sat
                acc["sat_n"] += u.numel()
                # Convs fed the same input (binary_pw_down1/2) count it once network-wide.
                key = (u.data_ptr(), tuple(u.shape))
                if key not in self._seen_inputs:
                    self._seen_inputs.add(key)
                    self._net_sat[0] += sat
                    self._net_sat[1] += u.numel()
            return None
        return hook

    def _set_live(self, name, module, hw):
        mask = live_taps(module.kernel_size, module.stride, module.padding, hw)
        self._live_hw[name] = hw
        w = module.weight
        self._sample_idx.pop(name, None)
        if mask is None:
            self._live[name], self._n_live[name] = None, w.numel()
        else:
            self._live[name] = mask.to(w.device).view(1, 1, *mask.shape)
            self._n_live[name] = w.numel() // mask.numel() * int(mask.sum())

    def _sample(self, name, t: torch.Tensor) -> torch.Tensor:
        """An evenly strided copy of ~SAMPLE_PER_LAYER elements of t (live taps only)."""
        idx = self._sample_idx.get(name)
        if idx is None:
            live = self._live[name]
            keep = torch.ones(t.shape, dtype=torch.bool) if live is None else \
                live.cpu().expand(t.shape)
            pos = torch.nonzero(keep.reshape(-1)).view(-1)
            idx = self._sample_idx[name] = pos[:: max(1, pos.numel() // SAMPLE_PER_LAYER)][
                :SAMPLE_PER_LAYER].to(t.device)
        return t.reshape(-1).index_select(0, idx).float()

    # -- the per-iteration calls ---------------------------------------------------------------
    def start_iteration(self, it: int):
        """Call before the forward pass of iteration `it` (any running counter)."""
        self._active = int(it) % self.every == 0
        self._seen_inputs = set()
        self._snap = {}

    @torch.no_grad()
    def before_step(self):
        """Call after backward, before optimizer.step(): sign snapshot and gradient statistics."""
        if not self._active:
            return
        for name, m in self.layers:
            w = m.weight
            snap = {"pos": torch.gt(w, 0, out=self._buffer(("pos", name), w, torch.bool))}
            g = w.grad
            if g is not None:
                g = g.detach().to_dense() if g.is_sparse else g.detach()
                live, n_live = self._live[name], self._n_live[name]
                gabs = torch.abs(g, out=self._buffer("f0", g, g.dtype))
                acc = self._acc[name]
                gsum = gabs.sum()     # padding-only taps have zero gradient: no mask needed
                dead = torch.le(gabs, self.dead_tol, out=self._buffer(("dead", name), w, torch.bool))
                weak = torch.le(gabs, WEAK_REL * gsum / n_live,
                                out=self._buffer(("weak", name), w, torch.bool))
                if live is not None:
                    dead.logical_and_(live)
                    weak.logical_and_(live)
                acc["dead"] += torch.count_nonzero(dead)
                acc["weak"] += torch.count_nonzero(weak)
                acc["grad_n"] += n_live
                acc["grad_abs"] += gsum
                snap["dead"], snap["weak"] = dead, weak
                self._samples["grad_abs"].append(self._sample(name, gabs))
            self._snap[name] = snap

    @torch.no_grad()
    def after_step(self):
        """Call after optimizer.step(): count the sign flips and record the effective step."""
        if not self._active:
            return
        self._active = False
        if not self._snap:          # before_step() was not called in this iteration
            return
        self._measured += 1
        groups = {}
        if self.optimizer is not None:
            groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        for name, m in self.layers:
            snap = self._snap.get(name)
            if snap is None:
                continue
            w = m.weight
            acc = self._acc[name]
            live, n_live = self._live[name], self._n_live[name]
            flipped = torch.gt(w, 0, out=self._buffer("b0", w, torch.bool))
            flipped ^= snap["pos"]
            if live is not None:
                flipped.logical_and_(live)
            acc["ff"] += torch.count_nonzero(flipped)
            acc["ff_n"] += n_live
            if "dead" not in snap or id(w) not in groups:
                continue
            step = effective_step(self.optimizer, w, groups[id(w)],
                                  out=self._buffer("f0", w, torch.float32))
            if step is None:
                continue
            sabs = step.abs_()
            if live is not None:
                sabs.mul_(live)
            ssum = sabs.sum()
            # strictly greater: with lr 0 nothing moves (and nothing is "revived")
            moving = torch.gt(sabs, REVIVE_REL * ssum / n_live, out=self._buffer("b0", w, torch.bool))
            dead, weak = snap["dead"], snap["weak"]
            masked = self._buffer("f1", w, torch.float32)
            acc["step_abs"] += ssum
            acc["step_n"] += n_live
            acc["dead_step"] += torch.mul(sabs, dead, out=masked).sum()
            acc["weak_step"] += torch.mul(sabs, weak, out=masked).sum()
            acc["dead_s"] += torch.count_nonzero(dead)
            acc["weak_s"] += torch.count_nonzero(weak)
            acc["dead_rev"] += torch.count_nonzero(dead.logical_and_(moving))
            acc["weak_rev"] += torch.count_nonzero(weak.logical_and_(moving))
            self._samples["step_abs"].append(self._sample(name, sabs))
        self._snap = {}

    # -- the epoch summary ---------------------------------------------------------------------
    @torch.no_grad()
    def epoch_metrics(self) -> dict[str, float]:
        """{key: float} over the iterations measured since the last call; then resets.

        Network-wide: measured_iterations, ff, c2i, saturation, dead, weak, grad_abs_mean,
        step_abs_mean, dead_revived, weak_revived, dead_step_ratio, weak_step_ratio,
        latent_gt1, latent_abs_mean, padding_only, grad_abs_p10/p50/p90, step_abs_p10/p50/p90.
        Weight statistics are over the weights outside padding-only taps (see live_taps;
        `padding_only` is the fraction left out, 0 at ImageNet sizes).
        Per binary conv: 'ff/<name>', 'c2i/<name>', 'saturation/<name>', 'dead/<name>',
        'latent_gt1/<name>'. A key without data (no measured iteration, no optimizer state,
        no dead weight) is left out rather than given a made-up value.
        """
        if self._closed:
            return {}
        out: dict[str, float] = {"measured_iterations": float(self._measured)}
        tot = {k: 0.0 for k in (*_COUNTS, *_SUMS)}
        c2i = gt1 = abs_sum = n_all = n_total = 0.0
        per_layer = {}
        for name, m in self.layers:
            w = m.weight.detach()
            acc = {k: v.item() for k, v in self._acc[name].items()}
            for k, v in acc.items():
                tot[k] += v
            live, n = self._live[name], self._n_live[name]
            changed_mask = torch.gt(w, 0, out=self._buffer("b0", w, torch.bool))
            changed_mask.logical_xor_(self._ref[name])
            wabs = torch.abs(w, out=self._buffer("f0", w, w.dtype))
            big_mask = torch.gt(wabs, 1, out=self._buffer("b1", w, torch.bool))
            if live is not None:
                changed_mask.logical_and_(live)
                big_mask.logical_and_(live)
                wabs.mul_(live)
            changed = torch.count_nonzero(changed_mask).item()
            big = torch.count_nonzero(big_mask).item()
            n_total += w.numel()
            c2i += changed
            gt1 += big
            abs_sum += wabs.sum(dtype=torch.float64).item()
            n_all += n
            layer = {"c2i": changed / n, "latent_gt1": big / n}
            if acc["ff_n"]:
                layer["ff"] = acc["ff"] / acc["ff_n"]
            if acc["sat_n"]:
                layer["saturation"] = acc["sat"] / acc["sat_n"]
            if acc["grad_n"]:
                layer["dead"] = acc["dead"] / acc["grad_n"]
            per_layer[name] = layer

        if tot["ff_n"]:
            out["ff"] = tot["ff"] / tot["ff_n"]
        out["c2i"] = c2i / n_all
        sat, sat_n = self._net_sat.tolist()
        if sat_n:
            out["saturation"] = sat / sat_n
        if tot["grad_n"]:
            out["dead"] = tot["dead"] / tot["grad_n"]
            out["weak"] = tot["weak"] / tot["grad_n"]
            out["grad_abs_mean"] = tot["grad_abs"] / tot["grad_n"]
        if tot["step_n"]:
            mean_step = tot["step_abs"] / tot["step_n"]
            out["step_abs_mean"] = mean_step
            for kind in ("dead", "weak"):
                if tot[f"{kind}_s"]:
                    out[f"{kind}_revived"] = tot[f"{kind}_rev"] / tot[f"{kind}_s"]
                    if mean_step > 0:
                        out[f"{kind}_step_ratio"] = tot[f"{kind}_step"] / tot[f"{kind}_s"] / mean_step
        out["latent_gt1"] = gt1 / n_all
        out["padding_only"] = 1.0 - n_all / n_total
        out["latent_abs_mean"] = abs_sum / n_all
        for key, samples in self._samples.items():
            if samples:
                values = torch.cat([s.cpu() for s in samples]).double()
                if values.numel() > 4_000_000:
                    values = values[:: values.numel() // 4_000_000 + 1]
                q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
                for p, v in zip((10, 50, 90), q.tolist()):
                    out[f"{key}_p{p}"] = v
        for name, layer in per_layer.items():
            for k, v in layer.items():
                out[f"{k}/{name}"] = v
        self._reset()
        return out

    def close(self):
        """Remove the hooks and free the snapshots and buffers."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._active = False
        self._closed = True
        self._snap, self._buffers, self._ref = {}, {}, {}


def c2i_reference(args, state, student: nn.Module, classes: int, log) -> dict:
    """The weights the analysis's C2I counts sign changes from: step 1's initialisation (rebuilt
    from the seed the run started with, whatever --seed a relaunch gives), step 2's
    --init-checkpoint (the resumed weights if that file is gone). `args`: the run's flags; `state`:
    its utils.run_folder.TrainState."""
    if args.step == 1:
        with torch.random.fork_rng(devices=[]):  # the run's own generator state stays as it is
            torch.manual_seed(state.init_seed)
            weights = reactnet_a(binary_weights=False, num_classes=classes).state_dict()
    elif state.epoch == 0 and not state.progress.iteration:
        weights = student.state_dict()
    elif os.path.isfile(args.init_checkpoint):
        initial = reactnet_a(binary_weights=True, num_classes=classes)
        load_weights(initial, args.init_checkpoint)
        weights = initial.state_dict()
    else:
        log(f"=> {args.init_checkpoint} is gone: C2I is measured against the resumed weights")
        weights = student.state_dict()
    return {k: v.clone() for k, v in weights.items() if v.ndim == 4}
