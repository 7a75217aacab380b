"""Mixed precision (--amp): which mode runs on which device, autocast and fp16 loss scaling."""
import contextlib

import torch

from utils.errors import UserError, warn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode, device, main_process=True):
    """The precision of --amp on `device`: 'auto' is bf16 on CUDA devices with native bf16
    (emulated bf16 is slower than float32, so it does not count) and off elsewhere; UserError
    for bf16 on a GPU without it, a warning (printed where `main_process`) for bf16/fp16 on a
    CPU without fast kernels for them."""
    if mode not in ("auto", "off", *AMP_DTYPES):
        raise ValueError(f"unknown precision {mode!r}: auto, off, bf16 or fp16")
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(
        including_emulation=False)
    if mode == "auto":
        return "bf16" if native_bf16 else "off"
    if mode == "bf16" and device.type == "cuda" and not native_bf16:
        raise UserError("--amp bf16: this GPU has no native bfloat16; use --amp fp16 (with "
                        "loss scaling) or --amp off", all_ranks=True)
    if device.type == "cpu" and mode != "off" and not cpu_has_fast(mode) and main_process:
        dtype = str(AMP_DTYPES[mode]).removeprefix("torch.")
        warn(f"--amp {mode}: this CPU has no fast {dtype} kernels, so the step runs "
             f"many times slower than float32 (python bench.py --amp {mode}, and --amp off, "
             f"measure it); use --amp off here")
    return mode


def cpu_has_fast(mode):
    """Whether torch's oneDNN reports fast kernels for the --amp dtype on this CPU: bf16 needs
    AVX-512 (BW, VL and DQ) on x86, fp16 AVX512-FP16 or AMX-FP16."""
    name = {"bf16": "_is_mkldnn_bf16_supported", "fp16": "_is_mkldnn_fp16_supported"}[mode]
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


class MixedPrecision:
    """Autocast and loss scaling for one of the --amp modes ('off', 'bf16', 'fp16').

    `autocast()` wraps the model's forward pass (bf16/fp16 matmuls and convolutions, float32
    elsewhere); fp16 adds a torch.amp.GradScaler: the loss is multiplied by the scale S before
    backward, the gradients divided by S before the step, and a step whose gradients are not
    finite is skipped with S halved (S doubles after 2000 finite steps). With a fused optimizer
    (SGD/AdamW on CUDA, utils.optim.uses_fused_kernels) the step reads that finite flag on the
    device; otherwise GradScaler.step reads it on the host, one synchronisation per fp16 step
    (LARS). bf16 has none.
    """

    def __init__(self, mode, device):
        self.mode = mode
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self):
        if self.mode == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.mode])

    def backward(self, loss):
        """loss.backward(), of the scaled loss with fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer):
        """optimizer.step(), through the scaler with fp16 (which then may skip it)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self):
        """The scaler's state for the checkpoint's "scaler" entry (None without a scaler)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state):
        """Restore what state_dict returned; a checkpoint without scaler state leaves it fresh."""
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


FLOAT32 = MixedPrecision("off", torch.device("cpu"))
