"""`--multiple_gpus`: one process per visible GPU (or `--nproc K` processes), started by the script
itself through torch.distributed's own launcher (the elastic agent torchrun runs), so every
process runs exactly the torchrun code path: DDP, negatives gathered from every process,
global-batch BatchNorm, rank 0 writing. `-bs` stays the global batch.

    python main.py DATAPATH RESPATH -bs 250 -c --multiple_gpus     # every visible GPU (NCCL)
    python main.py DATAPATH RESPATH -bs 250 --multiple_gpus --nproc 2   # 2 CPU processes (gloo)

The workers are the same command line with the launcher's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...) and LAUNCHER_ENV set, which tells them not to launch again.
"""
import os
import sys
import uuid

from utils.errors import UserError, warn

LAUNCHER_ENV = "SIMCLR_TOOLKIT_LAUNCHED_BY"


def launched_by_torchrun():
    """True when torchrun (or another launcher using its variables) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_by_us():
    """True in a worker that --multiple_gpus started."""
    return os.environ.get(LAUNCHER_ENV) == "multiple_gpus"


def process_count(args):
    """How many processes --multiple_gpus / --nproc start here (1: run in this process).

    With -c: --nproc K, else every visible GPU; UserError for more than there are. Without -c:
    --nproc K CPU processes (gloo); --multiple_gpus alone is a UserError (there are no GPUs to
    use)."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc} must be at least 1 process")
    if not args.cuda:
        if nproc is None:
            raise UserError("--multiple_gpus needs -c (CUDA); add -c, or give --nproc K to run "
                            "K processes on the CPU, or drop --multiple_gpus")
        return nproc
    import torch
    if not torch.cuda.is_available():
        raise UserError("-c asks for CUDA but no CUDA device is available; run without -c to "
                        "use the CPU")
    visible = torch.cuda.device_count()
    if nproc is not None and nproc > visible:
        raise UserError(f"--nproc {nproc}: only {visible} GPU(s) are visible; use --nproc "
                        f"{visible} or fewer")
    count = nproc or visible
    if count == 1 and nproc is None:
        warn("--multiple_gpus: only 1 GPU visible, running on one GPU")
    return count


def wants_launch(args):
    """Whether this command starts worker processes (--multiple_gpus or --nproc, not already a
    worker of a launcher)."""
    asked = getattr(args, "multiple_gpus", False) or getattr(args, "nproc", None) is not None
    if not asked:
        return False
    if launched_by_torchrun() or launched_by_us():
        if not launched_by_us():
            raise UserError("--multiple_gpus and --nproc start their own processes and do not "
                            "combine with torchrun, which already runs one process per GPU; "
                            "drop them", all_ranks=True)
        return False
    return True


def launch_workers(args, script, argv):
    """Run `script argv` in process_count(args) processes through torch.distributed's elastic
    launcher on this machine (c10d rendezvous on a free local port, as torchrun --standalone);
    returns the exit status: 0, or the first failing worker's (2 for a UserError, which that
    worker has already printed; 130 after Ctrl-C, the checkpoint saved)."""
    count = process_count(args)
    if count == 1:
        return None  # one device: the plain single-process path
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[LAUNCHER_ENV] = "multiple_gpus"
    if "OMP_NUM_THREADS" not in os.environ:  # one core's share per CPU worker, as torchrun
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    print(f"--multiple_gpus: starting {count} process(es) "
          f"({'one per GPU, NCCL' if args.cuda else 'on the CPU, gloo'}); -bs "
          f"{getattr(args, 'batch_size', '?')} is the global batch", flush=True)
    try:
        elastic_launch(config, sys.executable)("-u", script, *argv)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((c for c in codes if c in (2, 130)), codes[0] if codes else 1) or 1
    except (KeyboardInterrupt, SignalException):
        return 130
    return 0
