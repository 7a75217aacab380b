"""Segmentation (segment.py, utils/segmentation.py): metrics against scikit-learn, image and
mask kept aligned by the joint augmentation (a hand-made pattern), the decoders' output shapes
and the pretrained encoder's keys, the dilated encoder (--output-stride) against the strided one
and torchvision's, an end-to-end run on Fashion-MNIST labelmaps (better than
predicting the majority class, frozen encoder bit-identical, resumed exactly) and one-line
errors for bad labelmaps, all through the real command line where users go."""
import copy
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.metrics import accuracy_score, jaccard_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from conftest import (assert_one_line_error, copy_of_killed_run, run_in_process, run_script,
                      start_script, step_losses, wait_for_step)
from make_demo_data import build_segmentation_data
from utils.model import build_encoder, build_model, encoder_state
from utils.segmentation import (JointTransform, SegmentationNet, build_segmentation_net,
                                confusion_matrix, dilate_encoder, segmentation_scores,
                                stage_strides)
from utils.transforms import denormalize

FAST_SEGMENT = ["-bs", "8", "-nw", "0", "--warmup-epochs", "0"]
# Tiny tensors: one thread is as fast as two on an idle machine, and on a shared 2-core CPU two
# threads wait on each other (measured 4 s per 16 px step with two under load, 0.2 s with one).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_metrics_match_sklearn(rng):
    """Confusion matrix, per-class IoU, mIoU and pixel accuracy over all valid pixels equal
    scikit-learn's confusion_matrix, jaccard_score and accuracy_score on the flattened
    non-ignored pixels; class 4 (absent from truth and prediction) is NaN and left out of the
    mean, class 3 (predicted, never true) has IoU 0 and counts."""
    target = rng.choice([0, 1, 2, 255], size=(6, 9, 11), p=[0.4, 0.3, 0.2, 0.1])
    pred = rng.choice([0, 1, 2, 3], size=target.shape, p=[0.3, 0.3, 0.3, 0.1])
    pred[target == 0] = np.where(rng.random((target == 0).sum()) < 0.7, 0, pred[target == 0])
    matrix = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5, 255)
    valid = target != 255
    t, p = target[valid], pred[valid]
    np.testing.assert_array_equal(matrix.numpy(), sk_confusion_matrix(t, p, labels=range(5)))
    scores = segmentation_scores(matrix)
    reference = jaccard_score(t, p, labels=range(5), average=None, zero_division=0)
    seen = np.isin(range(5), np.concatenate([t, p]))
    assert seen.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(np.asarray(scores["iou"])[seen], reference[seen], rtol=1e-12)
    assert np.isnan(scores["iou"][4]) and scores["iou"][3] == 0
    assert scores["miou"] == pytest.approx(reference[seen].mean(), rel=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(accuracy_score(t, p), rel=1e-12)
    assert scores["pixels"] == valid.sum()


def pattern():
    """A 32x32 pattern without symmetry: labelmap with classes 0, 1, 2 and the ignore value
    255 in blocks, and the image whose gray level is a function of the class."""
    mask = np.zeros((32, 32), np.int64)
    mask[2:30, 3:9] = 1
    mask[4:14, 16:30] = 2
    mask[20:28, 20:26] = 255
    levels = {0: 20, 1: 120, 2: 220, 255: 70}
    image = np.vectorize(levels.get)(mask).astype(np.uint8)
    return Image.fromarray(image), torch.from_numpy(mask), levels


def test_joint_augmentation_keeps_image_and_mask_aligned():
    """Over 40 random crops and flips, every output pixel whose 3x3 mask neighbourhood is one
    class has the gray level of that class in the image (the two were cropped and flipped
    alike), masks keep only the original values (nearest neighbour), and the check would fail
    for a mask flipped on its own."""
    img, mask, levels = pattern()
    transform = JointTransform(32, [0.5], [0.25], train=True, min_scale=0.3)
    flipped_seen, crops, agreement, misaligned = 0, set(), [], []
    for seed in range(40):
        torch.manual_seed(seed)
        image, out = transform(img, mask)
        assert image.shape == (1, 32, 32) and out.shape == (32, 32) and out.dtype == torch.int64
        assert set(out.unique().tolist()) <= {0, 1, 2, 255}
        gray = (denormalize(image[None], [0.5], [0.25])[0, 0] * 255).numpy()
        expected = np.vectorize(levels.get)(out.numpy())
        window = torch.nn.functional.unfold(out[None, None].double(), 3, padding=1)
        interior = (window.amax(1) == window.amin(1)).reshape(32, 32).numpy()
        interior[[0, -1], :] = interior[:, [0, -1]] = False
        agreement.append((np.abs(gray - expected) < 3)[interior].mean())
        misaligned.append((np.abs(gray - expected[:, ::-1]) < 3)[interior].mean())
        flipped_seen += bool(out[3:29, 0:12].eq(1).sum() < out[3:29, 20:32].eq(1).sum())
        crops.add(tuple(out.sum(0).tolist()))
    assert min(agreement) > 0.99, agreement
    assert max(misaligned) < 0.9, misaligned
    assert 5 < flipped_seen < 35 and len(crops) > 30


def test_evaluation_transform_resizes_mask_with_nearest():
    """Eval: Resize to S x S, the mask by nearest neighbour (no new values), at the same size
    as the image; at the native size both are unchanged."""
    img, mask, _ = pattern()
    image, out = JointTransform(32, [0.0], [1.0], train=False)(img, mask)
    assert torch.equal(out, mask)
    np.testing.assert_allclose(image[0].numpy() * 255, np.asarray(img), atol=1e-3)
    image, out = JointTransform(20, [0.0], [1.0], train=False)(img, mask)
    assert image.shape == (1, 20, 20) and out.shape == (20, 20)
    assert set(out.unique().tolist()) == {0, 1, 2, 255}


@pytest.mark.parametrize("arch,stem,decoder", [("resnet18", "cifar", "fcn"),
                                               ("resnet18", "imagenet", "unet"),
                                               ("resnet50", "imagenet", "unet")])
def test_network_logits_at_input_size_from_simclr_encoder(arch, stem, decoder):
    """The encoder of a SimCLR model (utils.model.build_model) loads strictly into the
    network, which returns (B, K, H, W) logits at the input size, odd sizes included."""
    torch.manual_seed(0)
    simclr = build_model(arch, 3, stem, [64, 16])
    net = build_segmentation_net(arch, 3, stem, 4, decoder)
    net.encoder.load_state_dict(encoder_state(simclr.state_dict()), strict=True)
    x = torch.randn(2, 3, 19, 23) if stem == "cifar" else torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 4, *x.shape[2:])
        torch.testing.assert_close(net.stages(x)[-1].mean((2, 3)), simclr.eval()(x)[0])


def with_random_statistics(encoder):
    """The encoder in eval mode with random BatchNorm running statistics (not the identity)."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return encoder.eval()


@pytest.mark.parametrize("arch,stem,output_stride", [("resnet18", "half", 4),
                                                     ("resnet18", "cifar", 2),
                                                     ("resnet50", "cifar", 4)])
def test_dilated_stages_sampled_every_stride_equal_the_strided_stages(arch, stem,
                                                                      output_stride):
    """The a trous identity: each stage of the dilated encoder, sampled every s_native / s
    pixels, equals the stage of the same weights with their strides (an independent reference:
    the undilated network), and layer4's stride is then output_stride."""
    torch.manual_seed(0)
    strided = with_random_statistics(build_encoder(arch, 1, stem)[0])
    dilated = copy.deepcopy(strided)
    native = stage_strides(strided)
    assert dilate_encoder(dilated, output_stride) == stage_strides(dilated)
    assert stage_strides(dilated)[-1] == output_stride < native[-1]
    x = torch.randn(2, 1, 30, 30)
    decoder = torch.nn.Identity()
    with torch.no_grad():
        pairs = zip(SegmentationNet(strided, decoder).stages(x),
                    SegmentationNet(dilated, decoder).stages(x), native, stage_strides(dilated))
        for a, b, s_native, s in pairs:
            k = s_native // s
            # the same sums in another order: float32 rounding, relative to the stage's scale
            torch.testing.assert_close(b[..., ::k, ::k], a, rtol=1e-4,
                                       atol=1e-5 * a.abs().max().item())


def test_dilated_resnet50_is_torchvisions_replace_stride_with_dilation():
    """ResNet-50 (imagenet stem) dilated to output stride 8 has the convolutions (stride,
    dilation, padding) of torchvision's resnet50(replace_stride_with_dilation=[False, True,
    True]) and, with the same weights, its outputs; the state-dict keys are unchanged."""
    torch.manual_seed(0)
    ours = with_random_statistics(build_encoder("resnet50", 3, "imagenet")[0])
    keys = list(ours.state_dict())
    dilate_encoder(ours, 8)
    assert list(ours.state_dict()) == keys
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(ours.state_dict())
    theirs = dict(reference.named_modules())
    for name, conv in ours.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            assert (conv.stride, conv.dilation, conv.padding) == (
                theirs[name].stride, theirs[name].dilation, theirs[name].padding), name
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.eval()(x))


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory):
    """Fashion-MNIST (else digits) object/background labelmaps made by make_demo_data: 4
    train, 2 val, 3 test images per class, classes background and object, 255 on faint pixels."""
    folder = tmp_path_factory.mktemp("seg") / "segmentation"
    build_segmentation_data(str(folder), (4, 2, 3), garments=False)
    return folder


def listed_masks(list_path):
    folder = os.path.dirname(list_path)
    lines = [line.split(",") for line in Path(list_path).read_text().splitlines()
             if line and not line.startswith("#")]
    return [os.path.join(folder, mask) for _, mask in lines]


def majority_miou(train_list, test_list, size):
    """mIoU of predicting the most frequent training class everywhere on the test labelmaps
    resized to size x size by PIL's nearest neighbour (255 ignored)."""
    train = np.concatenate([np.asarray(Image.open(p)).ravel() for p in listed_masks(train_list)])
    majority = np.bincount(train[train != 255]).argmax()
    test = np.concatenate([np.asarray(Image.open(p).resize((size, size), Image.NEAREST)).ravel()
                           for p in listed_masks(test_list)])
    test = test[test != 255]
    present = np.unique(test)
    return (test == majority).mean() / len(present)


def test_segment_end_to_end_frozen_resumed(pretrained, seg_data, tmp_path):
    """segment.py on the pretrained test model (16 px), encoder frozen, U-Net decoder: 1 epoch,
    then the same command with --epochs 2 resumes it. The encoder's tensors (weights and
    BatchNorm statistics) stay bit-identical to model.pth, the decoder changes in epoch 2, the
    step losses of epoch 1 are kept, the test mIoU beats the majority class's, and the outputs
    are written."""
    respath, _ = pretrained
    model = os.path.join(respath, "model", "model.pth")
    out = tmp_path / "seg"
    lists = [seg_data / "train.txt", model, out, "--val-list", seg_data / "val.txt",
             "--test-list", seg_data / "test.txt", "--classes", seg_data / "classes.txt",
             "--freeze", "--decoder", "unet", *FAST_SEGMENT]
    first = run_script("segment.py", *lists, "--epochs", "1", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    after_one = torch.load(out / "checkpoint.pth", weights_only=True)
    second = run_script("segment.py", *lists, "--epochs", "2", env=ONE_THREAD)
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "epoch 2/2" in second.stdout
    after_two = torch.load(out / "checkpoint.pth", weights_only=True)
    assert after_two["script"] == "segment" and after_two["step"] == 2 * (40 // 8)
    losses = after_two["history"]["series"]["loss"]
    assert torch.equal(losses[:5], after_one["history"]["series"]["loss"])
    assert after_two["format_version"] == 2 and after_two["extra"]["num_classes"] == 2

    pretrained_encoder = encoder_state(torch.load(model, weights_only=True))
    trained = after_two["model"]
    for key, value in pretrained_encoder.items():
        assert torch.equal(trained[f"encoder.{key}"], value), key
    decoder = [k for k in trained if k.startswith("decoder.") and "weight" in k]
    assert decoder and all(not torch.equal(trained[k], after_one["model"][k]) for k in decoder)

    metrics = json.loads((out / "metrics.json").read_text())
    reference = majority_miou(seg_data / "train.txt", seg_data / "test.txt", 16)
    assert metrics["test"]["miou"] > reference + 0.02, (metrics["test"]["miou"], reference)
    assert metrics["test"]["majority_class_reference"]["miou"] == pytest.approx(reference,
                                                                                abs=0.01)
    assert metrics["resolution"] == 16 and metrics["n_pairs"] == {"train": 40, "val": 20,
                                                                  "test": 30}
    native = stage_strides(build_encoder("resnet18", 1, metrics["model_meta"]["stem"])[0])
    assert metrics["stage_strides"] == native  # --output-stride auto: U-Net's own strides
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "metric,val,test" and rows[1].startswith("IoU background,")
    assert rows[1:3] == [f"IoU {name}," + ",".join(f"{v:.4f}" for v in (
        metrics["val"]["iou"][name], metrics["test"]["iou"][name]))
        for name in ("background", "object")]
    assert len(rows) == 1 + 2 + 2 and rows[-2].startswith("mIoU,")
    assert (out / "predictions.png").stat().st_size > 10_000 and (out / "best.pth").exists()


def test_decoder_trains_alone_first_then_the_encoder_joins(pretrained, seg_data, tmp_path):
    """--decoder-epochs 1: after epoch 1 every encoder weight is bit-identical to model.pth
    (its learning rate was 0); after epoch 2 the encoder weights have
    moved too, at 0.1 times the decoder's rate (the optimizer's groups)."""
    model = os.path.join(pretrained[0], "model", "model.pth")
    out = tmp_path / "seg"
    args = [seg_data / "train.txt", model, out, "--val-list", seg_data / "val.txt",
            "--decoder-epochs", "1", "--encoder-lr-ratio", "0.1", *FAST_SEGMENT]
    first = run_script("segment.py", *args, "--epochs", "1", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    assert "encoder: lr x0.1 from epoch 2" in first.stdout
    pretrained_encoder = encoder_state(torch.load(model, weights_only=True))
    weights = [k for k in pretrained_encoder if k.endswith("weight") or k.endswith("bias")]
    after_one = torch.load(out / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(after_one["model"][f"encoder.{k}"], pretrained_encoder[k])
               for k in weights)
    second = run_script("segment.py", *args, "--epochs", "2", env=ONE_THREAD)
    assert second.returncode == 0, second.stderr
    after_two = torch.load(out / "checkpoint.pth", weights_only=True)
    moved = [k for k in weights
             if not torch.equal(after_two["model"][f"encoder.{k}"], pretrained_encoder[k])]
    assert sorted(moved) == sorted(weights)
    groups = after_two["optimizer"]["param_groups"]
    encoder = [g for g in groups if g.get("start_step") == 5]
    assert encoder and all(g["lr_scale"] == 0.1 for g in encoder)
    assert sum(len(g["params"]) for g in encoder) == len(weights)


def test_segment_baseline_without_modelpath(seg_data, tmp_path):
    """--baseline without MODELPATH: TRAIN_LIST RESPATH, the network from --arch/--stem (here
    the imagenet stem), mean/std from the training images; no val split, so best.pth is the
    last epoch."""
    out = tmp_path / "base"
    result = run_script("segment.py", seg_data / "train.txt", out, "--baseline", "--arch",
                        "resnet18", "--stem", "imagenet", "--image-size", "16", "--decoder",
                        "fcn",
                        "--test-list", seg_data / "test.txt", "--epochs", "1", *FAST_SEGMENT,
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "random weights (--baseline)" in result.stdout
    assert "layer4 stride at most 4: dilated" in result.stdout  # --output-stride auto, fcn
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["output_stride"] == "auto" and metrics["stage_strides"] == [4, 4, 4, 4]
    assert metrics["baseline"] and metrics["modelpath"] is None and "val" not in metrics
    assert metrics["num_classes"] == 2 and metrics["best_epoch"] == 1
    assert 0 <= metrics["test"]["pixel_accuracy"] <= 1
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["model_meta"]["stem"] == "imagenet" and "optimizer" not in best


def bad_labelmap(kind, folder):
    """A labelmap for folder/image.png (28x28) with one defect: another size, a class index 7
    (with --num-classes 3; the 255 pixels beside it are fine), or RGB."""
    path = folder / f"bad_{kind}.png"
    if kind == "size":
        Image.fromarray(np.zeros((20, 28), np.uint8)).save(path)
    elif kind == "index":
        values = np.full((28, 28), 255, np.uint8)
        values[:5] = 1
        values[5:8] = 7
        Image.fromarray(values).save(path)
    else:
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind,fragments", [
    ("size", ["bad_size.png", "28x20 px", "28x28"]),
    ("index", ["bad_index.png", "class index 7", "3 classes", "--num-classes 8"]),
    ("rgb", ["bad_rgb.png", "3 channels", "RGB", "single-channel"])])
def test_bad_labelmap_is_one_line_error_naming_it(pretrained, gray_image, tmp_path, kind,
                                                  fragments):
    """Each defect stops segment.py before training with one line naming the labelmap; the
    bad pair comes after a good one (classes 0, 1 and the ignore value 255)."""
    respath, _ = pretrained
    gray_image.save(tmp_path / "image.png")
    good = np.where(np.asarray(gray_image) >= 32, 1, 0).astype(np.uint8)
    good[np.asarray(gray_image) == 1] = 255
    Image.fromarray(good).save(tmp_path / "good.png")
    bad = bad_labelmap(kind, tmp_path)
    listing = tmp_path / "train.txt"
    listing.write_text(f"# image,labelmap\nimage.png,good.png\nimage.png,{bad.name}\n")
    result = run_in_process("segment.py", listing, os.path.join(respath, "model", "model.pth"),
                            tmp_path / "out", "--num-classes", "3", *FAST_SEGMENT, env=ONE_THREAD)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def killed_run_args(pretrained, seg_data, out):
    """Encoder trained too, augmentation in 2 worker processes, a decision (and so a mid-epoch
    checkpoint) at every step: 5 steps per epoch, 10 in all."""
    model = os.path.join(pretrained[0], "model", "model.pth")
    return [seg_data / "train.txt", model, out, "--val-list", seg_data / "val.txt",
            "--classes", seg_data / "classes.txt", "--epochs", "2", *FAST_SEGMENT, "-nw", "2",
            "--log-every", "1", "--checkpoint-minutes", "0.0001"]


@pytest.fixture(scope="module")
def uninterrupted_and_killed(pretrained, seg_data, tmp_path_factory):
    """The per-step losses of an uninterrupted run, and the RESPATH of the same run SIGKILLed
    inside epoch 2 (its checkpoint holds at least 6 steps)."""
    full = tmp_path_factory.mktemp("full")
    result = run_script("segment.py", *killed_run_args(pretrained, seg_data, full),
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = tmp_path_factory.mktemp("killed")
    proc = start_script("segment.py", *killed_run_args(pretrained, seg_data, killed),
                        env=ONE_THREAD)
    wait_for_step(killed / "checkpoint.pth", 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return step_losses(full / "checkpoint.pth"), killed


@pytest.mark.parametrize("layout", ["current", "before the engine"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(uninterrupted_and_killed, layout,
                                                            pretrained, seg_data, tmp_path):
    """The killed run resumed with the same command gives the uninterrupted per-step losses;
    so does its checkpoint rewritten in the layout segment.py wrote before the engine."""
    reference, killed = uninterrupted_and_killed
    respath, checkpoint = copy_of_killed_run(killed, tmp_path, layout, range(6, 10))
    result = run_script("segment.py", *killed_run_args(pretrained, seg_data, respath),
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout
    np.testing.assert_allclose(step_losses(checkpoint), reference, rtol=0, atol=1e-5)
    ckpt = torch.load(checkpoint, weights_only=True)
    assert [e["epoch"] for e in ckpt["history"]["evaluations"]] == [1, 2]
