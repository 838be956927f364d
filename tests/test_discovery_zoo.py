"""Discovery against timm's own drop paths: one model per timm family, on the meta device.

The oracle is timm itself (``examples/benchmarks/zoo_coverage.py``, which sweeps the whole zoo): the
model is built with ``drop_path_rate=0.1`` on every block, one training-mode forward pass records which
``DropPath`` modules are called, and a gate must cover exactly each called drop path that timm adds to a
shortcut. Drop paths timm applies to something that is not added to a shortcut (mobilevit, vovnet,
rdnet, resnest's input drop) must get no gate and must be reported; ResNeSt, whose every drop path is on
the block input, gets its residual blocks by structure (one gate per block). The gates must not depend on
``drop_path_rate`` (the same names at 0).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "zoo_coverage.py"


def _zoo():
    spec = importlib.util.spec_from_file_location("zoo_coverage", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zoo_coverage", module)
    spec.loader.exec_module(module)
    return module


# The model of each timm family (timm module) that takes drop_path_rate and builds and discovers fastest.
FAMILY_MODELS = {
    "beit": "beit_base_patch16_384",
    "byoanet": "eca_halonext26ts",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_lite_tiny",
    "convit": "convit_small",
    "convnext": "test_convnext3",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_9_dagger_240",
    "csatv2": "csatv2",
    "cspnet": "darknet17",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit3_small_patch16_224",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "tinynet_e",
    "efficientvim": "efficientvim_m1",
    "eva": "vit_base_patch16_sapiens2",
    "fasternet": "fasternet_t2",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m_enc",
    "hardcorenas": "hardcorenas_a",
    "hgnet": "hgnetv2_b1",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "levit": "levit_128s",
    "lowformer": "lowformer_e2",
    "mambaout": "test_mambaout",
    "maxxvit": "coatnet_0_224",
    "metaformer": "caformer_s18",
    "mlp_mixer": "resmlp_12_224",
    "mobilenetv3": "tf_mobilenetv3_small_100",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevitv2_150",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_par_gap",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_s_224",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m_enc",
    "rdnet": "rdnet_tiny",
    "regnet": "regnety_002",
    "res2net": "res2net50_48w_2s",
    "resnest": "resnest26d",  # resnest14d (every block has a projection shortcut): its own test below
    "resnet": "resnet14t",
    "resnetv2": "resnetv2_50d_evos",
    "rexnet": "rexnet_150",
    "sequencer": "sequencer2d_s",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_21m_512",
    "tnt": "tnt_s_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_pcpvt_small",
    "visformer": "visformer_tiny",
    "vision_transformer": "vit_base_patch16_xp_224",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_384",
    "vision_transformer_relpos": "vit_srelpos_small_patch16_224",
    "vision_transformer_sam": "samvit_base_patch16",
    "vitamin": "vitamin_base_224",
    "volo": "volo_d2_224",
    "vovnet": "vovnet39a",
    "xception_aligned": "xception41",
    "xcit": "xcit_small_12_p16_224",
}

# Families where timm calls a DropPath on something that is not added to a shortcut: no gate, a warning.
QUIRK_FAMILIES = {"mobilevit", "rdnet", "resnest", "vovnet"}


@pytest.fixture(scope="module")
def zoo():
    return _zoo()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_gates_are_exactly_timms_drop_paths(zoo, family: str) -> None:
    name = FAMILY_MODELS[family]
    rec = zoo.evaluate_timm(name)
    assert rec["family"] == family and rec["takes_drop_path_rate"]
    assert rec["status"] == "ok", rec.get("error")
    where = f"{name}: gates {[b['name'] for b in rec['branches']]}"
    assert rec["misses"] == [], f"{where}; timm drop paths in no gate: {rec['misses']}"
    assert rec["extra_gates"] == [], f"{where}; gates on no timm drop path: {rec['extra_gates']}"
    assert rec["merged_gates"] == [] and rec["split_slots"] == [] and rec["quirk_gated"] == []
    assert rec["exact"] and rec["gates"] == rec["expected"]
    assert rec["same_at_0"], f"{name}: other branches at drop_path_rate=0: {rec.get('branches_at_0')}"
    if family in QUIRK_FAMILIES:
        assert rec["not_residual"], f"{name}: expected drop paths that timm does not add to a shortcut"
        text = "\n".join(rec["warnings"])
        # one warning counts them all and names the first 20
        count = re.search(r"left (\d+) residual-looking place", text)
        assert count and int(count.group(1)) == len(rec["not_residual"]), f"{name}: {text[:300]}"
        shown = re.findall(r"^  (\S+): drop-path slot applied to something that is not added", text, re.M)
        assert shown and set(shown) <= set(rec["not_residual"]) and len(shown) == min(20, len(rec["not_residual"]))
        # ResNeSt's blocks are gated by structure (its slot drops the block input); the others say how to gate
        hint = "the block holding it is gated by structure" if family == "resnest" else "blocks="
        assert "not added to a shortcut" in text and hint in text
    else:
        assert rec["not_residual"] == [] and rec["expected"] > 0


@pytest.mark.slow
def test_resnest_with_only_projection_blocks_is_gated_by_its_slot_class(zoo) -> None:
    # resnest14d: one bottleneck per stage, each with a projection shortcut, so no instance of the class
    # adds its input unchanged (structure alone would take it for a NAS cell). The class carries timm's
    # drop-path slot, so its author meant it as a stochastic-depth block: one gate per block.
    rec = zoo.evaluate_timm("resnest14d")
    assert rec["status"] == "ok", rec.get("error")
    assert [b["name"] for b in rec["branches"]] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert all(b["skippable"] and b["slot"] is None for b in rec["branches"])
    assert rec["misses"] == [] and rec["extra_gates"] == [] and rec["exact"] and rec["gates"] == rec["expected"] == 4
    assert rec["same_at_0"]


# torchvision beyond the classifiers: one model per module of detection, segmentation, video, optical
# flow and quantization, with its residual count read off the architecture (ResNet-50: 16 bottlenecks;
# MobileNetV3-Large: 10 inverted residuals that add their input; MViT-v2-S and Video Swin-T: two per
# transformer block; RAFT-small: 2 bottlenecks x 3 stages in each of its two encoders; VGG, S3D,
# ShuffleNetV2, GoogLeNet, Inception: none). The oracle is torchvision's StochasticDepth calls and its
# residual block classes (detectors: called in a forward of the backbone, where those blocks are).
TV_FAMILY_MODELS = {
    "detection.faster_rcnn": ("fasterrcnn_mobilenet_v3_large_320_fpn", 10),
    "detection.fcos": ("fcos_resnet50_fpn", 16),
    "detection.keypoint_rcnn": ("keypointrcnn_resnet50_fpn", 16),
    "detection.mask_rcnn": ("maskrcnn_resnet50_fpn_v2", 16),
    "detection.retinanet": ("retinanet_resnet50_fpn", 16),
    "detection.ssd": ("ssd300_vgg16", 0),
    "detection.ssdlite": ("ssdlite320_mobilenet_v3_large", 10),
    "segmentation.deeplabv3": ("deeplabv3_mobilenet_v3_large", 10),
    "segmentation.fcn": ("fcn_resnet50", 16),
    "segmentation.lraspp": ("lraspp_mobilenet_v3_large", 10),
    "video.mvit": ("mvit_v2_s", 32),
    "video.resnet": ("r2plus1d_18", 8),
    "video.s3d": ("s3d", 0),
    "video.swin_transformer": ("swin3d_t", 24),
    "optical_flow.raft": ("raft_small", 12),
    "quantization.resnet": ("quantized_resnet18", 8),
    "quantization.mobilenetv3": ("quantized_mobilenet_v3_large", 10),
    "quantization.shufflenetv2": ("quantized_shufflenet_v2_x0_5", 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(TV_FAMILY_MODELS))
def test_torchvision_beyond_classifiers_gates_are_its_residuals(zoo, family: str) -> None:
    name, residuals = TV_FAMILY_MODELS[family]
    rec = zoo.evaluate_torchvision(name)
    assert rec["family"] == family and rec["built_on"] == "meta"
    assert rec["warnings"] == [], rec["warnings"]
    assert rec["gates"] == residuals, [b["name"] for b in rec["branches"]]
    if residuals == 0:
        assert rec["status"] == "no_drop_path_called"
        return
    assert rec["status"] == "ok", rec.get("error")
    assert rec["misses"] == [] and rec["extra_gates"] == [] and rec["merged_gates"] == [] and rec["split_slots"] == []
    assert rec["exact"] and rec["expected"] == residuals
