"""LARS, the large-batch optimizer of the SimCLR paper (You et al. 2017), as in SimCLR's code."""
import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum.

    For each parameter w with gradient g, in a group with weight decay wd, learning rate lr,
    momentum m and trust coefficient eta:
        d = g + wd * w
        r = eta * ||w|| / ||d||   if the group adapts and ||w|| > 0 and ||d|| > 0, else 1
        v = m * v + lr * r * d
        w = w - v
    Groups with `lars_adapt=False` (BatchNorm parameters and biases in SimCLR) get r = 1 and
    should be given wd = 0: they are plain momentum SGD. Because r = 1 when ||w|| = 0, a
    zero-initialised tensor still moves (a trust ratio of 0 would freeze it forever).
    The update runs on all tensors of a group at once (torch._foreach_*), without reading any
    value on the host.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, lars_adapt=True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0, eta > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_adapt=lars_adapt)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [w for w in group["params"] if w.grad is not None]
            if not params:
                continue
            grads = [w.grad for w in params]
            d = (torch._foreach_add(grads, params, alpha=group["weight_decay"])
                 if group["weight_decay"] else [g.clone() for g in grads])
            if group["lars_adapt"]:
                w_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                    group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(ratio.unbind()))
            buffers = []
            for w in params:
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, d, alpha=group["lr"])
            torch._foreach_sub_(params, buffers)
        return loss
